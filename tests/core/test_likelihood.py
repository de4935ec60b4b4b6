import pytest
import torch
from diffusers import DDPMScheduler

from diffalign.likelihood import (
    noisy_sample_and_target,
    pair_timesteps_and_noise,
    preference_errors,
    timestep_weights,
)


def sched(pred="epsilon"):
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=pred)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_forward_process_and_target_match_diffusers(pred):
    s = sched(pred)
    x0, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    x_t, target = noisy_sample_and_target(s, x0, noise, t)
    torch.testing.assert_close(x_t, s.add_noise(x0, noise, t))
    expected = noise if pred == "epsilon" else s.get_velocity(x0, noise, t)
    torch.testing.assert_close(target, expected)


def test_pairs_share_t_and_noise():
    x = torch.randn(6, 4, 8, 8)
    t, noise = pair_timesteps_and_noise(x, 1000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(t[:3], t[3:]) and torch.equal(noise[:3], noise[3:])
    t2, n2 = pair_timesteps_and_noise(x, 1000, share=False, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(n2[:3], n2[3:])


def test_preference_errors_by_hand():
    """A linear 'denoiser' f(x) = a·x: error = mean((ε - a x_t)^2), computed independently here."""
    s = sched()
    x0 = torch.randn(4, 3, 4, 4)
    t, noise = pair_timesteps_and_noise(x0, 1000, generator=torch.Generator().manual_seed(1))
    a = torch.tensor(0.5, requires_grad=True)
    calls = []

    def model(x_t, tt, cond):
        calls.append((torch.is_grad_enabled(), tt))
        return a * x_t

    def ref(x_t, tt, cond):
        calls.append((torch.is_grad_enabled(), tt))
        return 0.3 * x_t

    e = preference_errors(model, s, x0, None, reference=ref, t=t, noise=noise)
    abar = s.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    want = ((noise - 0.5 * x_t) ** 2).mean(dim=(1, 2, 3))
    want_ref = ((noise - 0.3 * x_t) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(torch.cat([e.model_w, e.model_l]), want)
    torch.testing.assert_close(torch.cat([e.ref_w, e.ref_l]), want_ref)
    assert [g for g, _ in calls] == [True, False]  # one grad call (2B batch), one no-grad reference call
    assert all(torch.equal(tt, t) for _, tt in calls)  # both at the pair's own t
    assert e.model_w.requires_grad and not e.ref_w.requires_grad


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
def test_snr_weighting_turns_the_error_into_the_x0_error(pred):
    """ω·mean((y - ŷ)²) equals mean((x0 - x̂0)²) with x̂0 from diffusers' own DDPMScheduler.step, per sample."""
    s = sched(pred)
    s.register_to_config(clip_sample=False)  # step() would clip x̂0 to [-1, 1]
    g = torch.Generator().manual_seed(0)
    x0, noise, prediction = (torch.randn(4, 3, 4, 4, generator=g) for _ in range(3))
    t = torch.tensor([0, 10, 500, 999])
    _, target = noisy_sample_and_target(s, x0, noise, t)
    x_t = s.add_noise(x0, noise, t)
    x0_hat = torch.stack([s.step(prediction[i:i + 1], int(t[i]), x_t[i:i + 1]).pred_original_sample[0]
                          for i in range(len(t))])
    want = ((x0 - x0_hat) ** 2).mean(dim=(1, 2, 3))
    got = timestep_weights(s, t, "snr") * ((target - prediction) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_snr_weighting_by_hand_on_the_sd_schedule():
    """ε-prediction, SD schedule: x0-error = ε-error / λ_t, λ_t = ᾱ_t/(1-ᾱ_t): 0.00085 / 2.6 / 214 at t = 0 / 500 / 999."""
    w = timestep_weights(sched(), torch.tensor([0, 500, 999]), "snr")
    torch.testing.assert_close(w, torch.tensor([8.5075e-4, 2.6188, 213.59]), rtol=1e-3, atol=0)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_min_snr_weights_equal_diffusers_compute_snr_recipe(pred):
    """diffusers examples/text_to_image/train_text_to_image.py: min(snr, γ) / snr (ε) or / (snr + 1) (v)."""
    from diffusers.training_utils import compute_snr

    s = sched(pred)
    t = torch.tensor([0, 1, 200, 500, 999])
    snr = compute_snr(s, t)
    want = torch.stack([snr, 5.0 * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    want = want / snr if pred == "epsilon" else want / (snr + 1)
    w = timestep_weights(s, t, "min_snr", 5.0)
    torch.testing.assert_close(w, want)
    with pytest.raises(ValueError, match="weighting must be one of"):
        timestep_weights(s, t, "bogus")


@pytest.mark.parametrize("weighting", ["snr", "min_snr"])
def test_zero_terminal_snr_step_gets_weight_one(weighting):
    """ᾱ_999 = 0 (rescale_betas_zero_snr): λ = 0, 1/λ would be inf; the step gets weight 1 as in diffusers."""
    s = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True)
    assert s.alphas_cumprod[999] == 0
    w = timestep_weights(s, torch.tensor([500, 999]), weighting)
    assert torch.isfinite(w).all() and w[1] == 1.0 and w[0] != 1.0
