"""Rollouts with log-probabilities (diffalign.online.rollout) on a tiny SD1.5 U-Net and tiny SD3 / FLUX
transformers.

- with the noise off, the flow rollout is ``sample_latents`` (Euler); the DDIM rollout's path is diffusers'
  ``DDIMScheduler.step`` fed the same noise (``variance_noise``), and its η = 0 path is ``sample_latents``;
- on-policy: ``rescore`` with the rollout's model returns the recorded log-probs (DDIM η = 1, flow SDE, CPS,
  with CFG), one step at a time exactly, batched steps to rounding;
- a window: stochastic inside, the ODE step outside;
- shapes, dtypes, the scheduler passed in unchanged.
"""

import copy

import pytest
import torch
from diffusers import DDIMScheduler
from fixtures.tiny_flow import tiny_flow_components
from fixtures.tiny_models import tiny_components

from diffalign.models import FlowCondition, UNetCondition, make_denoiser
from diffalign.online import Trajectory, rescore, rollout
from diffalign.sampling import sample_latents

N, STEPS, CFG = 2, 4, 4.5
UNET_SHAPE, FLOW_SHAPE = (N, 4, 16, 16), (N, 16, 16, 16)


@pytest.fixture(scope="module")
def unet():
    c = tiny_components("sd15", seed=0)
    c.unet.eval().requires_grad_(False)
    torch.manual_seed(1)
    cond = UNetCondition(torch.randn(N, 6, 32))
    uncond = UNetCondition(torch.randn(N, 6, 32))
    return make_denoiser("sd15", c.unet), c.noise_scheduler, cond, uncond


@pytest.fixture(scope="module")
def sd3():
    c = tiny_flow_components("sd3", seed=0)
    c.transformer.eval().requires_grad_(False)
    torch.manual_seed(2)
    cond = FlowCondition.of(torch.randn(N, 6, 32), torch.randn(N, 24))
    uncond = FlowCondition.of(torch.randn(N, 6, 32), torch.randn(N, 24))
    return make_denoiser("sd3", c.transformer), c.noise_scheduler, cond, uncond


@pytest.fixture(scope="module")
def flux():
    c = tiny_flow_components("flux", seed=0)
    c.transformer.eval().requires_grad_(False)
    torch.manual_seed(3)
    cond = FlowCondition.of(torch.randn(N, 6, 32), torch.randn(N, 16))
    return make_denoiser("flux", c.transformer), c.noise_scheduler, cond, None


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _guided(denoiser, x, t, cond, uncond, w):
    tt = t.expand(x.shape[0])
    if uncond is None:
        return denoiser(x, tt, cond).float()
    both = UNetCondition.cat(uncond, cond)
    o_u, o_c = denoiser(torch.cat([x, x]), torch.cat([tt, tt]), both).float().chunk(2)
    return o_u + w * (o_c - o_u)


# ------------------------------------------------------------------------------- noise off: the ODE sampler
@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize("sde_type", ["sde", "cps"])
def test_flow_rollout_without_noise_is_sample_latents(family, sde_type, request):
    denoiser, scheduler, cond, uncond = request.getfixturevalue(family)
    w = CFG if uncond is not None else 1.0
    ref = sample_latents(denoiser, scheduler, cond, uncond, FLOW_SHAPE, num_inference_steps=STEPS,
                         guidance_scale=w, generator=_gen(5))
    empty = rollout(denoiser, scheduler, cond, uncond, FLOW_SHAPE, num_inference_steps=STEPS,
                    guidance_scale=w, generator=_gen(5), sde_type=sde_type, window=(0, 0))
    torch.testing.assert_close(empty.final, ref, atol=1e-5, rtol=0)
    assert empty.window == (0, 0) and torch.isnan(empty.log_probs).all()
    silent = rollout(denoiser, scheduler, cond, uncond, FLOW_SHAPE, num_inference_steps=STEPS,
                     guidance_scale=w, generator=_gen(5), sde_type=sde_type, noise_level=0.0)
    torch.testing.assert_close(silent.final, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(silent.latents, empty.latents, atol=1e-5, rtol=0)
    given = rollout(denoiser, scheduler, cond, uncond, FLOW_SHAPE, num_inference_steps=STEPS,
                    guidance_scale=w, latents=empty.latents[0], sde_type=sde_type, window=(0, 0))
    torch.testing.assert_close(given.latents, empty.latents, atol=0, rtol=0)


def test_ddim_rollout_follows_diffusers_ddim_with_the_drawn_noise(unet):
    """DDPO's step = diffusers' DDIMScheduler.step(eta=1, variance_noise=ε) (ᾱ_0 at the last step, i.e.
    ``set_alpha_to_one=False``, SD1.5's config), with ε the generator's draws after the initial noise."""
    denoiser, scheduler, cond, uncond = unet
    traj = rollout(denoiser, scheduler, cond, uncond, UNET_SHAPE, num_inference_steps=STEPS,
                   guidance_scale=CFG, generator=_gen(7), eta=1.0)
    g = _gen(7)
    x = torch.randn(UNET_SHAPE, generator=g)
    ddim = DDIMScheduler.from_config(scheduler.config, set_alpha_to_one=False)
    ddim.set_timesteps(STEPS)
    torch.testing.assert_close(traj.timesteps, ddim.timesteps)
    path = [x]
    for t in ddim.timesteps:
        out = _guided(denoiser, x, t, cond, uncond, CFG)
        x = ddim.step(out, t, x, eta=1.0, variance_noise=torch.randn(UNET_SHAPE, generator=g)).prev_sample
        path.append(x)
    torch.testing.assert_close(traj.latents, torch.stack(path), atol=1e-5, rtol=1e-5)
    assert torch.isfinite(traj.log_probs).all()


def test_ddim_rollout_outside_the_window_is_sample_latents(unet):
    denoiser, scheduler, cond, uncond = unet
    ref = sample_latents(denoiser, scheduler, cond, uncond, UNET_SHAPE, num_inference_steps=STEPS,
                         guidance_scale=CFG, generator=_gen(3))
    traj = rollout(denoiser, scheduler, cond, uncond, UNET_SHAPE, num_inference_steps=STEPS,
                   guidance_scale=CFG, generator=_gen(3), window=(0, 0))
    torch.testing.assert_close(traj.final, ref, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="eta"):
        rollout(denoiser, scheduler, cond, uncond, UNET_SHAPE, num_inference_steps=STEPS, guidance_scale=CFG,
                eta=0.0)


# --------------------------------------------------------------------------------------- on-policy rescore
@pytest.mark.parametrize("case", ["ddim", "sde", "cps"])
def test_rescore_with_the_rollout_model_returns_the_recorded_log_probs(case, request):
    denoiser, scheduler, cond, uncond = request.getfixturevalue("unet" if case == "ddim" else "sd3")
    shape = UNET_SHAPE if case == "ddim" else FLOW_SHAPE
    kw = {"eta": 1.0} if case == "ddim" else {"sde_type": case, "noise_level": 0.7}
    traj = rollout(denoiser, scheduler, cond, uncond, shape, num_inference_steps=STEPS,
                   guidance_scale=CFG, generator=_gen(11), **kw)
    assert torch.isfinite(traj.log_probs).all()
    for i in range(STEPS):
        out = rescore(denoiser, scheduler, traj, cond, uncond, i, guidance_scale=CFG, **kw)
        assert (out.log_prob - traj.log_probs[i]).abs().max() < 1e-5, i
        torch.testing.assert_close(out.prev_sample, traj.latents[i + 1], atol=0, rtol=0)
        assert out.mean.shape == shape and out.std.shape == (N, 1, 1, 1)
    batched = rescore(denoiser, scheduler, traj, cond, uncond, range(STEPS))  # settings from the trajectory
    assert batched.log_prob.shape == (STEPS * N,)
    torch.testing.assert_close(batched.log_prob.view(STEPS, N), traj.log_probs, atol=1e-5, rtol=0)


def test_rescore_carries_the_gradient_of_the_policy(sd3):
    denoiser, scheduler, cond, uncond = sd3
    traj = rollout(denoiser, scheduler, cond, uncond, FLOW_SHAPE, num_inference_steps=STEPS,
                   guidance_scale=CFG, generator=_gen(0))
    assert not traj.latents.requires_grad and not traj.log_probs.requires_grad
    params = [p for p in denoiser.module.parameters()]
    try:
        for p in params:
            p.requires_grad_(True)
        out = rescore(denoiser, scheduler, traj, cond, uncond, 1)
        assert out.log_prob.requires_grad
        out.log_prob.sum().backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None


# -------------------------------------------------------------------------------------------------- window
@pytest.mark.parametrize("sde_type", ["sde", "cps"])
def test_flow_window_is_stochastic_inside_and_the_ode_outside(sd3, sde_type):
    denoiser, scheduler, cond, uncond = sd3
    steps, window = 5, (1, 3)
    traj = rollout(denoiser, scheduler, cond, uncond, FLOW_SHAPE, num_inference_steps=steps,
                   guidance_scale=CFG, generator=_gen(4), sde_type=sde_type, window=window)
    assert traj.window == window and traj.stochastic_steps == [1, 2]
    for i in range(steps):
        x = traj.latents[i]
        v = _guided(denoiser, x, traj.timesteps[i], cond, uncond, CFG)
        ode = x + (traj.sigmas[i + 1] - traj.sigmas[i]) * v
        if window[0] <= i < window[1]:
            assert (traj.latents[i + 1] - ode).abs().mean() > 1e-3, i
            assert torch.isfinite(traj.log_probs[i]).all()
        else:
            torch.testing.assert_close(traj.latents[i + 1], ode, atol=1e-5, rtol=0)
            assert torch.isnan(traj.log_probs[i]).all()
    for outside in (0, 3, 4):
        with pytest.raises(ValueError, match="window"):
            rescore(denoiser, scheduler, traj, cond, uncond, outside)
    with pytest.raises(ValueError, match="window"):
        rollout(denoiser, scheduler, cond, uncond, FLOW_SHAPE, num_inference_steps=steps, guidance_scale=CFG,
                window=(2, 6))


def test_with_per_sample_generators_a_trajectory_depends_on_its_own_generator_only(sd3):
    denoiser, scheduler, cond, uncond = sd3
    both = rollout(denoiser, scheduler, cond, uncond, FLOW_SHAPE, num_inference_steps=3, guidance_scale=CFG,
                   generator=[_gen(20), _gen(21)])
    second = rollout(denoiser, scheduler, cond.repeat(1), uncond, FLOW_SHAPE, num_inference_steps=3,
                     guidance_scale=CFG, generator=[_gen(30), _gen(21)])
    torch.testing.assert_close(both.latents[:, 1], second.latents[:, 1], atol=1e-5, rtol=0)
    assert not torch.allclose(both.latents[:, 0], second.latents[:, 0])


# ------------------------------------------------------------------------------- shapes, dtypes, scheduler
@pytest.mark.parametrize("family", ["unet", "sd3"])
def test_shapes_dtypes_and_the_scheduler_is_unchanged(family, request):
    denoiser, scheduler, cond, uncond = request.getfixturevalue(family)
    flow = family == "sd3"
    shape = FLOW_SHAPE if flow else UNET_SHAPE
    scheduler = copy.deepcopy(scheduler)  # the fixture's stays as built
    scheduler.set_timesteps(7)
    before = scheduler.timesteps.clone()
    before_sigmas = scheduler.sigmas.clone() if flow else None
    traj = rollout(denoiser, scheduler, cond, uncond, shape, num_inference_steps=STEPS,
                   guidance_scale=CFG, generator=_gen(1))
    assert isinstance(traj, Trajectory)
    assert traj.latents.shape == (STEPS + 1, *shape) and traj.latents.dtype == torch.float32
    assert traj.log_probs.shape == (STEPS, N) and traj.log_probs.dtype == torch.float32
    assert traj.timesteps.shape == (STEPS,)
    assert traj.num_steps == STEPS and traj.batch_size == N and traj.final.shape == shape
    assert traj.window == (0, STEPS) and traj.guidance_scale == CFG
    if flow:
        assert traj.timesteps.dtype == torch.float32 and traj.sigmas.shape == (STEPS + 1,)
        assert traj.sigmas[0] == 1 and traj.sigmas[-1] == 0
        torch.testing.assert_close(traj.timesteps, 1000 * traj.sigmas[:-1])
        assert (traj.noise_level, traj.sde_type, traj.eta) == (0.7, "sde", None)
        torch.testing.assert_close(scheduler.sigmas, before_sigmas, atol=0, rtol=0)
    else:
        assert traj.timesteps.dtype == torch.int64 and traj.sigmas is None
        assert (traj.eta, traj.noise_level, traj.sde_type) == (1.0, None, None)
    assert torch.equal(scheduler.timesteps, before) and scheduler.num_inference_steps == 7
    moved = traj.to("cpu")
    assert moved.window == traj.window and torch.equal(moved.latents, traj.latents)
