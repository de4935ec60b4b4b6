"""Rollouts that record per-step log-probabilities, and the re-scoring of a stored step (the GRPO forward).

:func:`rollout` samples N latents from pure noise with classifier-free guidance, like
:func:`diffalign.sampling.sample_latents`, but runs every step of the ``window`` as a *stochastic* reverse
step and records the whole chain in a :class:`Trajectory`:

- rectified flow (SD3/FLUX, :func:`diffalign.likelihood.is_flow_scheduler`): Flow-GRPO's SDE or CPS step
  (:func:`diffalign.online.logprob.flow_sde_step`) inside the window, the Euler ODE step
  :math:`x_{i+1} = x_i + (σ_{i+1} - σ_i)\\, \\hat v` outside it (noise level 0, as the official fast
  pipelines do);
- DDPM family (SD1.x/SDXL U-Nets): DDPO's DDIM step with η > 0
  (:func:`diffalign.online.logprob.ddim_step_with_logprob`) inside the window, diffusers' deterministic DDIM
  step (η = 0, exactly :func:`~diffalign.sampling.sample_latents`'s) outside it.

With :math:`\\hat o = o_u + w\\,(o_c - o_u)` the guided model output (one denoiser call per step on the
stacked ``[uncond; cond]`` batch; none when ``uncond`` is None, e.g. guidance-distilled FLUX-dev whose
denoiser carries the guidance input, or ``w = 1``), step i maps :math:`x_i \\to x_{i+1} = μ_i + s_i ε_i`
and records :math:`\\log p(x_{i+1} | x_i) = \\mathrm{mean}_{\\text{dims}} \\log\\mathcal N(x_{i+1}; μ_i,
s_i^2)` (the CPS step: :math:`-\\mathrm{mean}_{\\text{dims}}(x_{i+1}-μ_i)^2`, constants dropped).

:func:`rescore` recomputes :math:`μ_i` under the current model for stored ``(x_i, x_{i+1})`` (with gradient)
and returns the :class:`~diffalign.online.logprob.StepOutput` whose ``log_prob`` enters
:func:`diffalign.online.grpo.grpo_loss` as :math:`\\log p_θ`; with the rollout's own model it reproduces the
recorded ``log_probs`` (the on-policy ratio ρ = 1 at the first update).

Sources (read, restated, not copied): yifan123/flow_grpo
``flow_grpo/diffusers_patch/sd3_pipeline_with_logprob.py`` L132-171@ac4c86e (loop over the scheduler's
timesteps, CFG on ``cat([latents] * 2)``, ``noise_pred.float()``, ``all_latents`` starting at the initial
noise, one ``log_prob`` per step), the ``sde_window`` block of its later pipelines (``cur_noise_level = 0``
outside ``[start, end)``; ``qwenimage_edit_plus_pipeline_with_logprob.py``@9dcdc35); kvablack/ddpo-pytorch
``ddpo_pytorch/diffusers_patch/pipeline_with_logprob.py`` L182-220@1958463 (the same loop over a
``DDIMScheduler`` with η) and ``scripts/train.py`` L505-538@1958463 (re-scoring ``latents[:, j]`` ->
``next_latents[:, j]`` with the stored timestep).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..likelihood import is_flow_scheduler
from ..models.denoiser import UNetCondition
from ..sampling import inference_scheduler
from .logprob import SDE_TYPES, StepOutput, ddim_step_with_logprob, draw_noise, flow_sde_step


@dataclass
class Trajectory:
    """One batch of N rollouts of T steps (all tensors fp32 but ``timesteps`` for DDIM).

    - ``latents`` (T+1, N, C, h, w): :math:`x_0` = the initial pure noise, …, :math:`x_T` = the final sample
      (index i is the state *before* step i; flow_grpo stores the same list as ``all_latents``);
    - ``log_probs`` (T, N): :math:`\\log p(x_{i+1} | x_i)` of the step that drew :math:`x_{i+1}`, NaN for the
      deterministic steps outside ``window``;
    - ``timesteps`` (T,): the scheduler's values, the denoiser's ``t`` of step i (int64 DDIM timesteps, or
      float32 :math:`1000 σ_i` for rectified flow);
    - ``sigmas`` (T+1,) float32 for rectified flow (:math:`σ_0 = 1 > … > σ_T = 0`, step i goes from
      :math:`σ_i` to :math:`σ_{i+1}`), None for DDIM;
    - ``window`` ``(start, end)``: the half-open range of stochastic steps (the others ran the ODE);
    - the sampler's settings, the defaults of :func:`rescore`: ``guidance_scale``, ``noise_level`` and
      ``sde_type`` (flow; None for DDIM), ``eta`` (DDIM; None for flow).
    """

    latents: torch.Tensor
    log_probs: torch.Tensor
    timesteps: torch.Tensor
    sigmas: torch.Tensor | None
    window: tuple[int, int]
    guidance_scale: float = 1.0
    noise_level: float | None = None
    eta: float | None = None
    sde_type: str | None = None

    @property
    def num_steps(self) -> int:
        """T."""
        return self.timesteps.shape[0]

    @property
    def batch_size(self) -> int:
        """N."""
        return self.latents.shape[1]

    @property
    def is_flow(self) -> bool:
        return self.sigmas is not None

    @property
    def final(self) -> torch.Tensor:
        """The samples :math:`x_T`, (N, C, h, w)."""
        return self.latents[-1]

    @property
    def stochastic_steps(self) -> list[int]:
        """The step indices with a log-probability (``range(*window)``): the ones GRPO can train on."""
        return list(range(*self.window))

    def to(self, device) -> Trajectory:
        def move(x):
            return None if x is None else x.to(device)

        return Trajectory(move(self.latents), move(self.log_probs), move(self.timesteps), move(self.sigmas),
                          self.window, self.guidance_scale, self.noise_level, self.eta, self.sde_type)


# ------------------------------------------------------------------------------------------------ helpers


def _check_window(window, num_steps: int) -> tuple[int, int]:
    if window is None:
        return 0, num_steps
    start, end = (int(w) for w in window)
    if not 0 <= start <= end <= num_steps:
        raise ValueError(f"window {tuple(window)} must satisfy 0 <= start <= end <= {num_steps}")
    return start, end


def _guided(denoiser, x: torch.Tensor, t: torch.Tensor, cond: UNetCondition, uncond: UNetCondition | None,
            guidance_scale: float, dtype) -> torch.Tensor:
    """:math:`\\hat o = o_u + w (o_c - o_u)` from one call on ``[uncond; cond]`` (or :math:`o_c` unguided),
    fp32 (B, ...). ``t`` (B,)."""
    if uncond is not None and guidance_scale != 1.0:
        both = UNetCondition.cat(uncond, cond)
        o_u, o_c = denoiser(torch.cat([x, x]).to(dtype), torch.cat([t, t]), both).float().chunk(2)
        return o_u + guidance_scale * (o_c - o_u)
    return denoiser(x.to(dtype), t, cond).float()


def _euler(velocity: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, x: torch.Tensor):
    """The flow ODE step :math:`x + (σ' - σ) v` in fp32 (= FlowMatchEulerDiscreteScheduler.step)."""
    return x.float() + (sigma_next - sigma) * velocity.float()


def _flow_settings(noise_level: float, sde_type: str):
    if sde_type not in SDE_TYPES:
        raise ValueError(f"sde_type must be one of {SDE_TYPES}, got {sde_type!r}")
    if noise_level < 0:
        raise ValueError(f"noise_level must be >= 0, got {noise_level}")


# ------------------------------------------------------------------------------------------------ rollout
@torch.no_grad()
def rollout(denoiser, scheduler, cond: UNetCondition, uncond: UNetCondition | None, shape: Sequence[int], *,
            num_inference_steps: int, guidance_scale: float, generator=None, noise_level: float = 0.7,
            eta: float = 1.0, sde_type: str = "sde", window: tuple[int, int] | None = None,
            latents: torch.Tensor | None = None, device=None, dtype=torch.float32) -> Trajectory:
    """Sample N = ``shape[0]`` latents of ``shape`` (N, C, h, w) from pure noise, recording every state and
    the log-probability of every stochastic step (no gradient).

    ``denoiser(x, t, cond)``: :func:`diffalign.models.make_denoiser`'s callable (ε / v for U-Nets, velocity
    for flow transformers), called on ``x.to(dtype)``; its output is used in fp32. ``scheduler``: the
    training noise scheduler (never modified; :func:`diffalign.sampling.inference_scheduler` builds the copy). ``cond`` /
    ``uncond``: N rows each (``uncond=None`` or ``guidance_scale == 1``: no CFG; FLUX-dev always).
    ``generator``: None, a ``torch.Generator`` or a list of N (per-sample streams); it draws the initial noise
    first (so :math:`x_0` is :func:`~diffalign.sampling.sample_latents`'s for the same generator), then one
    (N, C, h, w) draw per stochastic step, in step order. ``latents`` (N, C, h, w): the initial noise
    instead. ``device``: default ``cond``'s.

    Rectified flow, step i from :math:`σ = σ_i` to :math:`σ' = σ_{i+1}` (``sde_type``: ``"sde"`` Flow-GRPO,
    ``"cps"`` coefficients-preserving; ``noise_level`` a, 0.7 in flow_grpo's configs):

    .. math::  x_{i+1} = μ(x_i, \\hat v, σ, σ'; a) + s\\, ε \\quad (i ∈ \\text{window}),
               \\qquad x_{i+1} = x_i + (σ' - σ)\\, \\hat v \\quad \\text{otherwise}.

    DDPM family (a DDIM grid of ``num_inference_steps``; ``eta`` η > 0, DDPO's 1.0): DDPO's DDIM step with
    :math:`σ_t = η\\sqrt{(1-\\bar α')/(1-\\bar α)\\,(1-\\bar α/\\bar α')}` inside the window, diffusers'
    ``DDIMScheduler.step`` with η = 0 outside.

    ``window`` ``(start, end)``: the stochastic steps ``start <= i < end``; default None = every step
    (flow_grpo@ac4c86e and DDPO). Flow-GRPO-Fast's windows come from :func:`diffalign.online.grpo.sde_window`
    (``sde_window(T)`` = all but the last step, whose Gaussian is the sharpest; with CPS the last step,
    σ' = 0, is deterministic anyway: σ_t = 0, ``log_prob`` ≡ 0). ``(0, 0)`` is the deterministic sampler
    (= ``sample_latents``).

    Returns a :class:`Trajectory`: ``latents`` (T+1, N, C, h, w), ``log_probs`` (T, N), ``timesteps`` (T,),
    ``sigmas`` (T+1,) or None. Memory: (T+1) copies of the batch's latents, on ``device``.
    """
    flow = is_flow_scheduler(scheduler)
    if flow:
        _flow_settings(noise_level, sde_type)
    elif eta <= 0:
        raise ValueError(f"eta must be > 0 (eta = 0 is the deterministic DDIM sampler: window=(0, 0)), "
                         f"got {eta}")
    shape = tuple(shape)
    n = shape[0]
    if len(cond) != n or (uncond is not None and len(uncond) != n):
        raise ValueError(f"cond and uncond must hold {n} rows (shape[0])")
    device = device if device is not None else cond.encoder_hidden_states.device
    sched = inference_scheduler(scheduler, num_inference_steps, shape)
    num_steps = sched.timesteps.shape[0]
    start, end = _check_window(window, num_steps)
    if latents is None:
        x = draw_noise(shape, generator, device) * getattr(sched, "init_noise_sigma", 1.0)
    else:
        if tuple(latents.shape) != shape:
            raise ValueError(f"latents {tuple(latents.shape)} do not have shape {shape}")
        x = latents.to(device=device, dtype=torch.float32)
    sigmas = sched.sigmas.to(device=device, dtype=torch.float32) if flow else None
    all_latents = [x]
    all_log_probs = torch.full((num_steps, n), float("nan"), device=device)
    for i, t in enumerate(sched.timesteps):  # on the scheduler's device (diffusers' step indexes with t)
        tt = torch.full((n,), float(t) if flow else int(t), device=device,
                        dtype=torch.float32 if flow else torch.long)
        out = _guided(denoiser, x, tt, cond, uncond, guidance_scale, dtype)
        stochastic = start <= i < end
        if flow and stochastic:
            step = flow_sde_step(out, sigmas[i], sigmas[i + 1], x, noise_level=noise_level,
                                 generator=generator, sde_type=sde_type)
            x, all_log_probs[i] = step.prev_sample, step.log_prob
        elif flow:
            x = _euler(out, sigmas[i], sigmas[i + 1], x)
        elif stochastic:
            step = ddim_step_with_logprob(out, sched, t, x, eta=eta, generator=generator)
            x, all_log_probs[i] = step.prev_sample, step.log_prob
        else:
            x = sched.step(out, t, x, eta=0.0).prev_sample.float()
        all_latents.append(x)
    return Trajectory(
        torch.stack(all_latents), all_log_probs, sched.timesteps.to(device), sigmas, (start, end),
        float(guidance_scale), noise_level=float(noise_level) if flow else None,
        eta=None if flow else float(eta), sde_type=sde_type if flow else None,
    )


# ------------------------------------------------------------------------------------------------ rescore
def rescore(denoiser, scheduler, trajectory: Trajectory, cond: UNetCondition, uncond: UNetCondition | None,
            step: int | Sequence[int], *, guidance_scale: float | None = None,
            noise_level: float | None = None, eta: float | None = None, sde_type: str | None = None,
            dtype=torch.float32) -> StepOutput:
    """:math:`\\log p_θ(x_{i+1} | x_i)` of stored step(s) i under the current ``denoiser``, **with gradient**
    (the GRPO training forward: call it inside the autocast / grad context of the update).

    ``step``: one index i in ``trajectory.window`` (returns (N,) / (N, C, h, w) fields), or a sequence of K
    indices run as **one** denoiser call on K·N rows (fields (K·N,) / (K·N, C, h, w), step-major: row
    k·N + j is sample j at ``step[k]``; reshape ``log_prob`` to (K, N)). Batched steps change the kernels'
    batch size, so their log-probs may differ from the recorded ones by float rounding; one step at a time
    with the rollout's batch reproduces them exactly (the Flow-GRPO FAQ's advice: equal batch sizes).

    ``cond`` / ``uncond``: the N rows the rollout used. ``guidance_scale``, ``noise_level`` / ``eta`` and
    ``sde_type`` default to the trajectory's (what the official trainers reuse from the sampling config).
    ``scheduler``: the training scheduler (never modified; DDIM needs its ``alphas_cumprod`` and grid, flow
    only checks the kind, σ comes from ``trajectory.sigmas``).

    Returns the sampler's :class:`StepOutput` with ``prev_sample`` = the stored :math:`x_{i+1}`: ``log_prob``
    (the policy term of :func:`~diffalign.online.grpo.grpo_loss`, gradient through μ), ``mean`` μ_θ and
    ``std`` (for Flow-GRPO's KL against the reference's μ, computed by calling ``rescore`` with the
    reference denoiser under ``torch.no_grad()``).
    """
    flow = is_flow_scheduler(scheduler)
    if flow != trajectory.is_flow:
        raise ValueError("scheduler and trajectory disagree on the model kind (flow vs DDPM family)")
    steps = [int(step)] if isinstance(step, (int, np.integer)) else [int(s) for s in step]
    start, end = trajectory.window
    if not steps or any(not start <= s < end for s in steps):
        raise ValueError(f"steps {steps} must lie in the stochastic window [{start}, {end}): the others ran "
                         "the ODE and have no log-probability")
    guidance_scale = trajectory.guidance_scale if guidance_scale is None else guidance_scale
    k, n = len(steps), trajectory.batch_size
    if len(cond) != n or (uncond is not None and len(uncond) != n):
        raise ValueError(f"cond and uncond must hold the trajectory's {n} rows")
    device = cond.encoder_hidden_states.device
    idx = torch.tensor(steps, device=trajectory.latents.device)
    x = trajectory.latents[idx].flatten(0, 1).to(device)
    prev = trajectory.latents[idx + 1].flatten(0, 1).to(device)
    t = trajectory.timesteps.to(device)[idx.to(device)].repeat_interleave(n)
    if k > 1:
        cond = cond.repeat(k)
        uncond = None if uncond is None else uncond.repeat(k)
    out = _guided(denoiser, x, t, cond, uncond, guidance_scale, dtype)
    if flow:
        noise_level = trajectory.noise_level if noise_level is None else noise_level
        sde_type = trajectory.sde_type if sde_type is None else sde_type
        _flow_settings(noise_level, sde_type)
        sig = trajectory.sigmas.to(device)
        i = idx.to(device)
        return flow_sde_step(out, sig[i].repeat_interleave(n), sig[i + 1].repeat_interleave(n), x,
                             noise_level=noise_level, prev_sample=prev, sde_type=sde_type)
    eta = trajectory.eta if eta is None else eta
    sched = inference_scheduler(scheduler, trajectory.num_steps, trajectory.latents.shape[1:])
    if not torch.equal(sched.timesteps.cpu(), trajectory.timesteps.cpu()):
        raise ValueError("the scheduler's DDIM grid differs from the trajectory's timesteps")
    return ddim_step_with_logprob(out, sched, t, x, eta=eta, prev_sample=prev)
