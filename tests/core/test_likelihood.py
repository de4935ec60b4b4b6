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
        calls.append(torch.is_grad_enabled())
        return a * x_t

    def ref(x_t, tt, cond):
        calls.append(torch.is_grad_enabled())
        return 0.3 * x_t

    e = preference_errors(model, s, x0, None, reference=ref, t=t, noise=noise)
    abar = s.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    want = ((noise - 0.5 * x_t) ** 2).mean(dim=(1, 2, 3))
    want_ref = ((noise - 0.3 * x_t) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(torch.cat([e.model_w, e.model_l]), want)
    torch.testing.assert_close(torch.cat([e.ref_w, e.ref_l]), want_ref)
    assert calls == [True, False]  # one grad call (2B batch), one no-grad reference call
    assert e.model_w.requires_grad and not e.ref_w.requires_grad


def test_min_snr_weights():
    s = sched()
    t = torch.tensor([1, 999])
    snr = s.alphas_cumprod[t] / (1 - s.alphas_cumprod[t])
    w = timestep_weights(s, t, "min_snr", 5.0)
    torch.testing.assert_close(w, torch.clamp(snr, max=5.0) / snr)
    assert w[0] < 1 and w[1] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="weighting must be one of"):
        timestep_weights(s, t, "bogus")
