"""The rectified-flow likelihood layer (SD3/SD3.5/FLUX), checked against the official code paths.

References, restated inline below rather than imported:
- diffusers ``examples/dreambooth/train_dreambooth_lora_sd3.py`` at 58eb52c: ``get_sigmas`` L1711-1720,
  timestep draw L1784-1792, ``noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise`` L1797,
  weighting L1815, ``target = noise - model_input`` L1821; ``train_dreambooth_lora_flux.py`` the same at
  L1678-1687, L1766-1779, L1817-1820 (both index ``noise_scheduler_copy``, a ``copy.deepcopy`` of the loaded
  scheduler, L1203/L1205).
- diffusers ``src/diffusers/training_utils.py`` (58eb52c L365, L392; the installed 0.42.1 is called directly):
  ``compute_density_for_timestep_sampling`` / ``compute_loss_weighting_for_sd3``.
- flow_grpo ``scripts/train_sd3_dpo.py`` at ac4c86e8: ``get_sigmas`` L179-188, the Flow-DPO step L881-939.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import (
    DDPMScheduler,
    EDMEulerScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
)
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from diffalign.likelihood import (
    FLOW_WEIGHTINGS,
    FlowTimestepSampling,
    flow_sigmas,
    flow_timesteps_from_u,
    is_flow_scheduler,
    noisy_sample_and_target,
    pair_timesteps_and_noise,
    preference_errors,
    sample_flow_timesteps,
    sample_flow_u,
    timestep_weights,
)
from diffalign.objectives import build_objective, dpo_loss
from diffalign.objectives.dpo import DPOConfig

# scheduler/scheduler_config.json as the models ship
SD3_CONFIG = {"num_train_timesteps": 1000, "shift": 3.0}  # stabilityai/stable-diffusion-3-medium-diffusers
FLUX_CONFIG = {  # black-forest-labs/FLUX.1-dev
    "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
    "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096,
}
U_FIXED = torch.tensor([0.0, 0.001, 0.1234, 0.25, 0.5, 0.7777, 0.999, 0.9999])


def flow_sched(cfg):
    return FlowMatchEulerDiscreteScheduler(**cfg)


def diffusers_get_sigmas(sched_copy, timesteps, n_dim, dtype=torch.float32):
    """diffusers' (and flow_grpo's) get_sigmas: exact-match lookup of each timestep in the copy's grid."""
    sigmas = sched_copy.sigmas.to(dtype=dtype)
    schedule_timesteps = sched_copy.timesteps
    step_indices = [(schedule_timesteps == t).nonzero().item() for t in timesteps]
    sigma = sigmas[step_indices].flatten()
    while len(sigma.shape) < n_dim:
        sigma = sigma.unsqueeze(-1)
    return sigma


def diffusers_training_path(sched_copy, u, x0, noise):
    """The SD3/FLUX LoRA scripts' lines, in order: indices, timesteps, sigmas, noisy input, target."""
    indices = (u * sched_copy.config.num_train_timesteps).long()
    timesteps = sched_copy.timesteps[indices]
    sigmas = diffusers_get_sigmas(sched_copy, timesteps, n_dim=x0.ndim, dtype=x0.dtype)
    noisy_model_input = (1.0 - sigmas) * x0 + sigmas * noise
    target = noise - x0
    return timesteps, sigmas, noisy_model_input, target


# ------------------------------------------------------------------------------------------ scheduler family
@pytest.mark.parametrize("sched, flow", [
    (FlowMatchEulerDiscreteScheduler(**SD3_CONFIG), True),
    (FlowMatchEulerDiscreteScheduler(**FLUX_CONFIG), True),
    (FlowMatchHeunDiscreteScheduler(shift=3.0), True),
    (DDPMScheduler(), False),
    (EulerDiscreteScheduler(), False),  # has sigmas (EDM-style, > 1) *and* alphas_cumprod: DDPM family
    (EDMEulerScheduler(), False),  # sigmas, no alphas_cumprod, but not a rectified flow
])
def test_is_flow_scheduler(sched, flow):
    assert is_flow_scheduler(sched) is flow


def test_unsupported_scheduler_is_a_one_line_error():
    with pytest.raises(ValueError, match="unsupported scheduler EDMEulerScheduler") as e:
        noisy_sample_and_target(EDMEulerScheduler(), torch.zeros(1, 2), torch.zeros(1, 2),
                                torch.tensor([1.0]))
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------- forward process
@pytest.mark.parametrize("cfg", [SD3_CONFIG, FLUX_CONFIG], ids=["sd3", "flux"])
@pytest.mark.parametrize("inference_state", [False, True], ids=["fresh", "after_set_timesteps"])
def test_forward_process_and_target_equal_diffusers_training_path(cfg, inference_state):
    """x_t and v* = ε − x0 equal the SD3/FLUX LoRA scripts' expressions, bit for bit, at several t; the
    library's scheduler may have been set up for inference (28 steps, FLUX with mu): it still uses the
    training grid."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(len(U_FIXED), 4, 8, 8, generator=g)
    noise = torch.randn(len(U_FIXED), 4, 8, 8, generator=g)
    sched_copy = copy.deepcopy(flow_sched(cfg))  # the scripts' noise_scheduler_copy, never set_timesteps
    timesteps, sigmas, want_x_t, want_target = diffusers_training_path(sched_copy, U_FIXED, x0, noise)

    sched = flow_sched(cfg)
    if inference_state:
        sched.set_timesteps(28, **({"mu": 1.15} if cfg.get("use_dynamic_shifting") else {}))
        assert len(sched.timesteps) == 28
    assert torch.equal(flow_timesteps_from_u(sched, U_FIXED), timesteps)
    assert torch.equal(flow_sigmas(sched, timesteps), sigmas.flatten())
    x_t, target = noisy_sample_and_target(sched, x0, noise, timesteps)
    assert torch.equal(x_t, want_x_t)
    assert torch.equal(target, want_target)


def test_training_grids_by_hand():
    """SD3: σ = 3s / (1 + 2s) on s = index-reversed k/1000; FLUX trains on the unshifted grid σ = s (dynamic
    shifting is applied at inference only). u = 0.5 -> index 500 -> s = 0.5; u = 0 -> index 0 -> s = 1."""
    u = torch.tensor([0.0, 0.5, 0.9999])
    sd3, flux = flow_sched(SD3_CONFIG), flow_sched(FLUX_CONFIG)
    torch.testing.assert_close(flow_timesteps_from_u(sd3, u), torch.tensor([1000.0, 750.0, 3 / 1.002]))
    torch.testing.assert_close(flow_timesteps_from_u(flux, u), torch.tensor([1000.0, 500.0, 1.0]))
    t = flow_timesteps_from_u(sd3, u)
    torch.testing.assert_close(flow_sigmas(sd3, t), torch.tensor([1.0, 0.75, 0.003 / 1.002]))
    x0, noise = torch.full((3, 2), 2.0), torch.full((3, 2), -1.0)
    x_t, target = noisy_sample_and_target(sd3, x0, noise, t)
    # (1 − σ)·2 + σ·(−1) = 2 − 3σ: σ = 1 -> −1, σ = 0.75 -> −0.25
    torch.testing.assert_close(x_t[:2, 0], torch.tensor([-1.0, -0.25]))
    assert torch.equal(target, torch.full((3, 2), -3.0))


def test_off_grid_timesteps_use_t_over_T():
    """Inference-grid timesteps (shifted, 28 steps) are not on the training grid: σ = t/T, which equals the
    inference scheduler's own sigmas, as timesteps = σ·T on every FlowMatch grid."""
    s = flow_sched(SD3_CONFIG)
    s.set_timesteps(28)
    torch.testing.assert_close(flow_sigmas(s, s.timesteps), s.sigmas[:-1], rtol=0, atol=1e-6)
    assert torch.equal(flow_sigmas(s, torch.tensor([123.25])), torch.tensor([0.12325]))


def test_forward_process_keeps_dtype_and_computes_in_fp32():
    s = flow_sched(SD3_CONFIG)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 4, 4, 4, generator=g).bfloat16()
    noise = torch.randn(2, 4, 4, 4, generator=g).bfloat16()
    t = torch.tensor([750.0, 300.0])
    x_t, target = noisy_sample_and_target(s, x0, noise, t)
    assert x_t.dtype == torch.bfloat16 and target.dtype == torch.float32
    sigma = flow_sigmas(s, t).view(-1, 1, 1, 1)
    assert torch.equal(x_t, ((1 - sigma) * x0.float() + sigma * noise.float()).bfloat16())


# --------------------------------------------------------------------------------------------- timesteps
def _stats_logit(u):
    z = torch.log(u) - torch.log1p(-u)
    return z.mean().item(), z.std().item()


def test_logit_normal_u_matches_diffusers_statistically():
    n = 20000
    ours = sample_flow_u(n, "logit_normal", logit_mean=0.3, logit_std=0.8,
                         generator=torch.Generator().manual_seed(0))
    theirs = compute_density_for_timestep_sampling("logit_normal", n, logit_mean=0.3, logit_std=0.8,
                                                   generator=torch.Generator().manual_seed(1))
    (m1, s1), (m2, s2) = _stats_logit(ours), _stats_logit(theirs)
    # standard error of the mean 0.8/sqrt(20000) = 0.006
    assert m1 == pytest.approx(0.3, abs=0.025) and s1 == pytest.approx(0.8, abs=0.025)
    assert m1 == pytest.approx(m2, abs=0.035) and s1 == pytest.approx(s2, abs=0.035)
    assert ours.dtype == torch.float32 and ours.shape == (n,) and ((ours > 0) & (ours < 1)).all()


@pytest.mark.parametrize("scheme", ["mode", "uniform"])
def test_mode_and_uniform_u_match_diffusers_statistically(scheme):
    n = 20000
    ours = sample_flow_u(n, scheme, mode_scale=1.29, generator=torch.Generator().manual_seed(0))
    theirs = compute_density_for_timestep_sampling(scheme, n, mode_scale=1.29,
                                                   generator=torch.Generator().manual_seed(1))
    q = torch.linspace(0.05, 0.95, 19)
    torch.testing.assert_close(torch.quantile(ours, q), torch.quantile(theirs, q), rtol=0, atol=0.02)
    if scheme == "uniform":
        torch.testing.assert_close(torch.quantile(ours, q), q, rtol=0, atol=0.02)
    else:  # u = 1 − w − 1.29 (cos²(πw/2) − 1 + w) is decreasing with f(0.5) = 0.5: the median stays 0.5,
        # and the mass moves to the middle: P(u < 0.25) = P(w > f⁻¹(0.25)) is below the uniform 0.25
        assert torch.quantile(ours, 0.5).item() == pytest.approx(0.5, abs=0.02)
        assert (ours < 0.25).float().mean().item() < 0.2


def test_u_is_reproducible_from_the_generator():
    a = sample_flow_u(8, generator=torch.Generator().manual_seed(3))
    b = sample_flow_u(8, generator=torch.Generator().manual_seed(3))
    c = sample_flow_u(8, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_mode_u_of_one_is_clamped_onto_the_grid():
    """mode gives u = 1 at w = 0, index ⌊u·T⌋ = T: clamped to the last grid point instead of an IndexError."""
    t = flow_timesteps_from_u(flow_sched(SD3_CONFIG), torch.tensor([1.0, 1.2, -0.1]))
    assert t[0] == t[1] == flow_sched(SD3_CONFIG).timesteps[-1] and t[2] == 1000.0


@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "uniform"])
def test_sampled_timesteps_are_training_grid_members(scheme):
    s = flow_sched(SD3_CONFIG)
    s.set_timesteps(28)  # inference state: the draw still uses the 1000-step training grid
    t = sample_flow_timesteps(4000, s, FlowTimestepSampling(scheme),
                              generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.float32 and torch.isin(t, flow_sched(SD3_CONFIG).timesteps).all()
    assert t.unique().numel() > 200  # not stuck on the 28 inference steps


def test_pairs_share_flow_t_and_noise():
    s = flow_sched(SD3_CONFIG)
    x = torch.randn(6, 4, 8, 8)
    t, noise = pair_timesteps_and_noise(x, s, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.float32 and t.shape == (6,)
    assert torch.equal(t[:3], t[3:]) and torch.equal(noise[:3], noise[3:])
    assert torch.isin(t, s.timesteps).all()
    t2, n2 = pair_timesteps_and_noise(x, s, share=False, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(n2[:3], n2[3:]) and not torch.equal(t2[:3], t2[3:])


def test_flow_pair_draw_uses_the_sampling_options():
    """t drawn first (n/2 values of u), then ε: t equals the grid at ⌊u·T⌋ for u from the same generator."""
    s, x = flow_sched(SD3_CONFIG), torch.randn(4, 2, 2, 2)
    sampling = FlowTimestepSampling("mode", mode_scale=0.8)
    t, _ = pair_timesteps_and_noise(x, s, generator=torch.Generator().manual_seed(5),
                                    timestep_sampling=sampling)
    u = sample_flow_u(2, "mode", mode_scale=0.8, generator=torch.Generator().manual_seed(5))
    assert torch.equal(t, flow_timesteps_from_u(s, u).repeat(2))


def test_ddpm_draw_unchanged_when_given_the_scheduler():
    x = torch.randn(6, 4, 8, 8)
    a = pair_timesteps_and_noise(x, 1000, generator=torch.Generator().manual_seed(0))
    b = pair_timesteps_and_noise(x, DDPMScheduler(), generator=torch.Generator().manual_seed(0))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and b[0].dtype == torch.long
    with pytest.raises(ValueError, match="rectified-flow schedulers only"):
        pair_timesteps_and_noise(x, DDPMScheduler(), timestep_sampling=FlowTimestepSampling())


def test_sampling_options_are_validated():
    with pytest.raises(ValueError, match="weighting_scheme must be one of"):
        FlowTimestepSampling("cosmap")
    with pytest.raises(ValueError, match="logit_std"):
        FlowTimestepSampling(logit_std=0.0)


# --------------------------------------------------------------------------------------------- weightings
@pytest.mark.parametrize("weighting", FLOW_WEIGHTINGS)
def test_weights_equal_diffusers_compute_loss_weighting_for_sd3(weighting):
    s = flow_sched(SD3_CONFIG)
    timesteps = flow_timesteps_from_u(s, U_FIXED)
    sigmas = diffusers_get_sigmas(copy.deepcopy(s), timesteps, n_dim=4)
    want = compute_loss_weighting_for_sd3(weighting, sigmas).flatten()
    assert torch.equal(timestep_weights(s, timesteps, weighting), want)


def test_weights_by_hand():
    """σ = 0.75 (SD3, t = 750): sigma_sqrt 1/0.5625 = 16/9; σ = 0.5 (FLUX, t = 500): cosmap
    2/(π·0.5) = 4/π."""
    t = torch.tensor([750.0])
    assert timestep_weights(flow_sched(SD3_CONFIG), t, "sigma_sqrt").item() == pytest.approx(16 / 9, rel=1e-6)
    assert timestep_weights(flow_sched(FLUX_CONFIG), t * 2 / 3, "cosmap").item() == pytest.approx(4 / math.pi,
                                                                                                   rel=1e-6)
    assert torch.equal(timestep_weights(flow_sched(SD3_CONFIG), t, "none"), torch.ones(1))


@pytest.mark.parametrize("weighting", ["snr", "min_snr", "bogus"])
def test_ddpm_weightings_on_a_flow_scheduler_are_a_one_line_error(weighting):
    match = r"one of \('none', 'sigma_sqrt', 'cosmap'\) for a rectified-flow"
    with pytest.raises(ValueError, match=match) as e:
        timestep_weights(flow_sched(SD3_CONFIG), torch.tensor([500.0]), weighting)
    assert "\n" not in str(e.value) and repr(weighting) in str(e.value)


@pytest.mark.parametrize("weighting", ["sigma_sqrt", "cosmap"])
def test_flow_weightings_on_a_ddpm_scheduler_are_a_one_line_error(weighting):
    with pytest.raises(ValueError, match=r"one of \('none', 'snr', 'min_snr'\) for a DDPM-family") as e:
        timestep_weights(DDPMScheduler(), torch.tensor([500]), weighting)
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------------------------- Flow-DPO
class LinearVelocity(torch.nn.Module):
    """v(x_t, t) = W·x_t (channel mixing) + b·t/1000: deterministic, depends on x_t and t."""

    def __init__(self, w, b):
        super().__init__()
        self.w, self.b = torch.nn.Parameter(w.clone()), torch.nn.Parameter(b.clone())

    def forward(self, x_t, t, cond=None):
        scale = (t / 1000).view(-1, 1, 1, 1)
        return torch.einsum("oc,nchw->nohw", self.w, x_t) + self.b.view(1, -1, 1, 1) * scale


def flow_grpo_dpo_loss(transformer, ref, noise_scheduler, model_input, noise, u, beta):
    """flow_grpo scripts/train_sd3_dpo.py at ac4c86e8, L881-939, with the transformer calls replaced by the
    linear models and the random draws (L884 ``torch.randn_like``, L890
    ``compute_density_for_timestep_sampling``) passed in."""
    bsz = model_input.shape[0] // 2  # L883
    noise = torch.cat([noise[:bsz], noise[:bsz]], dim=0)  # L886: chosen and rejected use the same noise
    indices = (u * noise_scheduler.config.num_train_timesteps).long()  # L897
    timesteps = noise_scheduler.timesteps[indices]  # L898
    timesteps = torch.cat([timesteps, timesteps], dim=0)  # L899
    sigmas = diffusers_get_sigmas(noise_scheduler, timesteps, n_dim=model_input.ndim)  # L902, get_sigmas L179
    noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise  # L903
    model_pred = transformer(noisy_model_input, timesteps)  # L906-912 ("learner" adapter)
    with torch.no_grad():
        model_pred_ref = ref(noisy_model_input, timesteps).detach()  # L913-922 ("ref" adapter)
    target = noise - model_input  # L924
    theta_mse = ((model_pred.float() - target.float()) ** 2).reshape(target.shape[0], -1).mean(dim=1)  # L926
    ref_mse = ((model_pred_ref.float() - target.float()) ** 2).reshape(target.shape[0], -1).mean(dim=1)
    # ^ L927
    model_w_err, model_l_err = theta_mse[:bsz], theta_mse[bsz:]  # L929-930
    ref_w_err, ref_l_err = ref_mse[:bsz], ref_mse[bsz:]  # L931-932
    w_diff = model_w_err - ref_w_err  # L933
    l_diff = model_l_err - ref_l_err  # L934
    w_l_diff = w_diff - l_diff  # L935
    inside_term = -0.5 * beta * w_l_diff  # L936
    loss = -F.logsigmoid(inside_term)  # L937
    return torch.mean(loss), timesteps, noise  # L939


@pytest.mark.parametrize("beta", [1.0, 100.0, 2000.0])
@pytest.mark.parametrize("cfg", [SD3_CONFIG, FLUX_CONFIG], ids=["sd3", "flux"])
def test_flow_dpo_equals_flow_grpo_values_and_gradients(beta, cfg):
    g = torch.Generator().manual_seed(0)
    B, C = 3, 4
    model_input = torch.randn(2 * B, C, 4, 4, generator=g)  # [winners; losers]
    noise = torch.randn(2 * B, C, 4, 4, generator=g)
    u = compute_density_for_timestep_sampling("logit_normal", B, logit_mean=0, logit_std=1, mode_scale=1.29,
                                              generator=g)
    w_ref = -0.5 * torch.eye(C) + 0.1 * torch.randn(C, C, generator=g)
    b_ref = 0.2 * torch.randn(C, generator=g)
    w0 = w_ref + 0.02 * torch.randn(C, C, generator=g)
    b0 = b_ref + 0.05 * torch.randn(C, generator=g)
    ref = LinearVelocity(w_ref, b_ref).requires_grad_(False)
    theirs_model, ours_model = LinearVelocity(w0, b0), LinearVelocity(w0, b0)

    sched = flow_sched(cfg)
    want, timesteps, shared_noise = flow_grpo_dpo_loss(theirs_model, ref, copy.deepcopy(sched), model_input,
                                                       noise, u, beta)
    want.backward()

    errors = preference_errors(ours_model, sched, model_input, None, reference=ref, t=timesteps,
                               noise=shared_noise)
    got = dpo_loss(errors.model_w, errors.model_l, errors.ref_w, errors.ref_l, beta=beta)
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    for ours, theirs in ((ours_model.w, theirs_model.w), (ours_model.b, theirs_model.b)):
        assert theirs.grad.abs().max() > 0
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-5, atol=1e-8)
    logits = -0.5 * beta * ((errors.model_w - errors.ref_w) - (errors.model_l - errors.ref_l))
    assert logits.abs().max() > 1e-3  # policy ≠ reference: the comparison is not at the ln 2 point

    # the registered objective is the same loss
    objective, _ = build_objective("dpo", DPOConfig(beta=beta))
    torch.testing.assert_close(objective(errors).loss, want, rtol=1e-6, atol=1e-7)


def test_flow_preference_errors_draw_shared_grid_timesteps():
    """t/noise None: the pair shares a float training-grid t; errors are velocity errors at that t."""
    s = flow_sched(SD3_CONFIG)
    x0 = torch.randn(4, 3, 4, 4)
    seen = []

    def model(x_t, t, cond):
        seen.append(t)
        return torch.zeros_like(x_t)

    e = preference_errors(model, s, x0, None, reference=model, generator=torch.Generator().manual_seed(2),
                          timestep_sampling=FlowTimestepSampling("uniform"))
    t, noise = pair_timesteps_and_noise(x0, s, generator=torch.Generator().manual_seed(2),
                                        timestep_sampling=FlowTimestepSampling("uniform"))
    assert torch.equal(seen[0], t) and torch.equal(seen[1], t) and torch.equal(e.timesteps, t[:2])
    assert e.timesteps.dtype == torch.float32 and torch.isin(e.timesteps, s.timesteps).all()
    want = ((noise - x0) ** 2).mean(dim=(1, 2, 3))  # zero prediction: the error is ‖v*‖²
    torch.testing.assert_close(torch.cat([e.model_w, e.model_l]), want)
