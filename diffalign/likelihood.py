"""The per-timestep ELBO term every objective is built on, for DDPM-family and rectified-flow schedulers.

**DDPM family** (a scheduler with ``alphas_cumprod``: DDPM, DDIM, Euler, DPM-Solver, …; SD1.x/SDXL U-Nets).
For a clean sample :math:`x_0`, an integer step :math:`t` and noise :math:`ε`, the forward process gives
:math:`x_t = \\sqrt{\\bar α_t}\\, x_0 + \\sqrt{1-\\bar α_t}\\, ε` and the denoiser's per-sample error is

.. math::  e_θ(x_0, t, ε, c) = ω(λ_t)\\; \\mathrm{mean}_{\\text{dims}}\\big[(y - f_θ(x_t, t, c))^2\\big]

where the target :math:`y` is ε (``epsilon``), :math:`v = \\sqrt{\\bar α_t} ε - \\sqrt{1-\\bar α_t} x_0`
(``v_prediction``) or :math:`x_0` (``sample``), and ω is 1 by default (what every official preference repo
uses), the conversion to an x0-error (``snr``) or min-SNR-γ (:func:`timestep_weights`, :data:`WEIGHTINGS`).
Up to constants and weighting, :math:`-e` is the per-timestep term of the ELBO of :math:`\\log p_θ(x_0 | c)`
(Diffusion-DPO paper, Eq. 14). t ~ U{0, …, T-1}, int64.

**Rectified flow** (``FlowMatchEulerDiscreteScheduler`` and kin, :func:`is_flow_scheduler`; SD3/SD3.5/FLUX
transformers). With :math:`σ = σ(t) ∈ [0, 1]` the scheduler's sigma of the float timestep t (σ = t/T on the
training grid, shift included, see :func:`flow_sigmas`):

.. math::  x_t = (1 - σ)\\, x_0 + σ\\, ε, \\qquad v^* = ε - x_0, \\qquad
           e_θ = ω(σ)\\; \\mathrm{mean}_{\\text{dims}}\\big[(v_θ(x_t, t, c) - v^*)^2\\big]

as diffusers trains SD3/FLUX (``examples/dreambooth/train_dreambooth_lora_sd3.py``) and flow_grpo's Flow-DPO
(``scripts/train_sd3_dpo.py``) computes it. t is drawn as diffusers does (:func:`sample_flow_u`: logit-normal,
``mode`` or uniform u, then the training grid's timestep at index ⌊u·T⌋, :func:`flow_timesteps_from_u`); ω is
1, ``sigma_sqrt`` or ``cosmap`` (diffusers' ``compute_loss_weighting_for_sd3``, :data:`FLOW_WEIGHTINGS`). Both
families give the same :class:`PairErrors`, so every objective applies unchanged (Flow-DPO is
:func:`diffalign.objectives.dpo.dpo_loss` on velocity errors).

The denoiser is any callable ``denoiser(x_t, t, cond) -> prediction`` with the shape of ``x_t``: a diffusers
U-Net wrapped by :class:`diffalign.models.UNetDenoiser`, a flow transformer wrapper predicting the velocity,
or an action MLP for robot policies. Shapes: ``x0`` is (N, ...), ``t`` is (N,) (int64 for the DDPM family,
float32 for rectified flow), ``cond`` is whatever the denoiser takes for a batch of N.

Preference pairs use the layout ``[winners; losers]`` along dim 0 (N = 2B). :func:`preference_errors` draws t
and noise once per pair (shared by winner and loser, as the official code does), runs the policy **once** on
the 2B batch and the reference **once** under ``torch.no_grad`` on exactly the same inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class PairErrors:
    """Per-sample denoising errors of a batch of B preference pairs, all of shape (B,).

    ``model_*`` carry gradients (policy), ``ref_*`` do not (reference, or ``None`` for reference-free
    objectives).
    ``timesteps`` (B,) are the diffusion steps the pair was noised at (shared by winner and loser by default;
    int64 for the DDPM family, float for rectified flow).
    """

    model_w: torch.Tensor
    model_l: torch.Tensor
    ref_w: torch.Tensor | None = None
    ref_l: torch.Tensor | None = None
    timesteps: torch.Tensor | None = None


Denoiser = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
WEIGHTINGS = ("none", "snr", "min_snr")  # DDPM family
# rectified flow: diffusers' compute_loss_weighting_for_sd3 / compute_density_for_timestep_sampling
FLOW_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")
FLOW_TIMESTEP_SAMPLING = ("logit_normal", "mode", "uniform")


# ------------------------------------------------------------------------------------------ scheduler family
_GRID_CACHE: dict = {}


def flow_training_grid(scheduler) -> tuple[torch.Tensor, torch.Tensor]:
    """The training grid ``(timesteps, sigmas)`` of a rectified-flow scheduler, each (T,) float32 on the CPU.

    Built from a fresh scheduler of the same class made from ``scheduler.config`` (cached per class and
    config), never from ``scheduler.timesteps``: a scheduler on which ``set_timesteps`` was called for
    inference (e.g. 28 steps, shifted by ``mu``) still yields the T-step grid diffusers trains on (its
    training scripts index an untouched ``copy.deepcopy`` of the loaded scheduler).
    ``FlowMatchEulerDiscreteScheduler`` builds it as ``s = (T, T-1, …, 1)/T``,
    ``σ = shift·s / (1 + (shift-1)·s)`` and ``timesteps = σ·T`` (descending, σ from 1 to about 1/T); with
    ``use_dynamic_shifting`` (FLUX.1) the shift is **not** applied, so FLUX trains on the unshifted grid
    σ = s. The returned tensors are shared: do not modify them in place.
    """
    config = dict(scheduler.config)
    key = (type(scheduler), tuple(sorted((k, repr(v)) for k, v in config.items())))
    grid = _GRID_CACHE.get(key)
    if grid is None:
        fresh = type(scheduler).from_config(config)
        timesteps = torch.as_tensor(fresh.timesteps, dtype=torch.float32).reshape(-1)
        # some kin (FlowMapEulerDiscreteScheduler) append the terminal σ = 0: keep σ_i of timestep_i
        sigmas = torch.as_tensor(fresh.sigmas, dtype=torch.float32).reshape(-1)[: timesteps.numel()]
        if len(_GRID_CACHE) >= 32:
            _GRID_CACHE.pop(next(iter(_GRID_CACHE)))
        grid = _GRID_CACHE[key] = (timesteps, sigmas)
    return grid


def is_flow_scheduler(scheduler) -> bool:
    """True for a rectified-flow scheduler (``FlowMatchEulerDiscreteScheduler``,
    ``FlowMatchHeunDiscreteScheduler``, ``FlowMatchLCMScheduler``, …), False for the DDPM family and anything
    else.

    The rule: no ``alphas_cumprod`` (every DDPM-family scheduler has one, including Euler/DPM-Solver, which
    also carry ``sigmas``), a ``sigmas`` attribute, and a training grid (:func:`flow_training_grid`) with
    ``0 ≤ σ ≤ 1`` and ``timesteps = σ·T``. The last condition keeps out EDM/consistency schedulers
    (``EDMEulerScheduler``, ``CMStochasticIterativeScheduler``), which have ``sigmas`` in (0.002, 80] and
    no ``alphas_cumprod`` but a different forward process.
    """
    if hasattr(scheduler, "alphas_cumprod") or not hasattr(scheduler, "sigmas"):
        return False
    config = getattr(scheduler, "config", None)
    num_train_timesteps = config.get("num_train_timesteps") if config is not None else None
    if not num_train_timesteps:
        return False
    try:
        timesteps, sigmas = flow_training_grid(scheduler)
    except (TypeError, ValueError, AttributeError, RuntimeError):
        return False
    if timesteps.numel() == 0 or sigmas.shape != timesteps.shape:
        return False
    in_unit = bool(((sigmas >= 0) & (sigmas <= 1)).all())
    return in_unit and torch.allclose(timesteps, sigmas * num_train_timesteps, rtol=1e-5, atol=1e-3)


def _scheduler_family(scheduler) -> str:
    """``"ddpm"`` or ``"flow"``; a one-line ValueError for anything else."""
    if hasattr(scheduler, "alphas_cumprod"):
        return "ddpm"
    if is_flow_scheduler(scheduler):
        return "flow"
    raise ValueError(f"unsupported scheduler {type(scheduler).__name__}: neither DDPM-family "
                     "(alphas_cumprod) nor rectified flow (sigmas in [0, 1], timesteps = sigma * T)")


def flow_sigmas(scheduler, t: torch.Tensor) -> torch.Tensor:
    """σ(t) of a rectified-flow scheduler, shape (N,), float32 on ``t.device``, for float timesteps t (N,).

    The rule: a t on the training grid (:func:`flow_training_grid`) gets that grid's stored σ (what
    diffusers' ``get_sigmas`` looks up by exact match, so values are bit-identical); any other t gets
    ``σ = t / T``, the relation every FlowMatch grid satisfies (``timesteps = σ·T``, shift included: the
    training grid, and the inference grids of ``set_timesteps`` with or without ``mu``). Grid points and t/T
    agree to within one float32 ulp.
    """
    grid_t, grid_s = flow_training_grid(scheduler)
    tf = t.reshape(-1).to(torch.float32)
    grid_t, grid_s = grid_t.to(tf.device), grid_s.to(tf.device)
    match = tf[:, None] == grid_t[None, :]  # (N, T)
    on_grid = match.any(dim=1)
    sigma_on_grid = grid_s[match.to(torch.int8).argmax(dim=1)]
    return torch.where(on_grid, sigma_on_grid, tf / scheduler.config.num_train_timesteps)


# ------------------------------------------------------------------------------------------------- timesteps
@dataclass(frozen=True)
class FlowTimestepSampling:
    """How rectified-flow timesteps are drawn (diffusers' SD3/FLUX training arguments: names, defaults).

    ``weighting_scheme``: ``logit_normal`` (SD3 default and flow_grpo's Flow-DPO, mean 0, std 1), ``mode``
    (``mode_scale`` 1.29) or ``uniform``. diffusers' scripts also accept ``sigma_sqrt``/``cosmap`` there,
    which sample uniformly *and* weight the loss: here the loss weighting is the separate ``weighting``
    argument (:data:`FLOW_WEIGHTINGS`), so that recipe is ``uniform`` + ``weighting="sigma_sqrt"``.
    """

    weighting_scheme: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29

    def __post_init__(self):
        if self.weighting_scheme not in FLOW_TIMESTEP_SAMPLING:
            raise ValueError(f"weighting_scheme must be one of {FLOW_TIMESTEP_SAMPLING}, got "
                             f"{self.weighting_scheme!r}")
        if not self.logit_std > 0:
            raise ValueError(f"logit_std must be > 0, got {self.logit_std}")


def sample_timesteps(n: int, num_train_timesteps: int, *, generator=None, device=None) -> torch.Tensor:
    """t ~ U{0, ..., T-1}, shape (n,), int64 (the official code's ``torch.randint(0, T)``)."""
    return torch.randint(0, num_train_timesteps, (n,), generator=generator, device=device, dtype=torch.long)


def sample_flow_u(n: int, weighting_scheme: str = "logit_normal", *, logit_mean: float = 0.0,
                  logit_std: float = 1.0, mode_scale: float = 1.29, generator: torch.Generator | None = None,
                  device=None) -> torch.Tensor:
    """u ∈ [0, 1] of shape (n,), float32, drawn from ``generator`` with the density diffusers'
    ``compute_density_for_timestep_sampling`` uses for SD3/FLUX training (Esser et al. 2024, §3.1):

    ``logit_normal``: ``u = sigmoid(m + s·z)``, z ~ N(0, 1) (m = ``logit_mean``, s = ``logit_std``);
    ``mode``: ``u = 1 - w - mode_scale·(cos²(πw/2) - 1 + w)``, w ~ U[0, 1);
    ``uniform``: u ~ U[0, 1).
    """
    if weighting_scheme not in FLOW_TIMESTEP_SAMPLING:
        raise ValueError(f"weighting_scheme must be one of {FLOW_TIMESTEP_SAMPLING}, got "
                         f"{weighting_scheme!r}")
    if weighting_scheme == "logit_normal":
        z = torch.randn((n,), generator=generator, device=device)
        return torch.sigmoid(logit_mean + logit_std * z)
    w = torch.rand((n,), generator=generator, device=device)
    if weighting_scheme == "mode":
        return 1 - w - mode_scale * (torch.cos(math.pi * w / 2) ** 2 - 1 + w)
    return w


def flow_timesteps_from_u(scheduler, u: torch.Tensor) -> torch.Tensor:
    """The training-grid timestep at index ``⌊u·T⌋``, shape (n,), float32 on ``u.device``.

    As diffusers' SD3/FLUX scripts and flow_grpo index ``scheduler.timesteps[(u * T).long()]`` on the training
    grid (:func:`flow_training_grid`; descending, so u → 0 is σ = 1, pure noise). The index is clamped to
    [0, T-1]: ``mode`` gives u = 1 for w = 0, which would index one past the end.
    """
    grid_t, _ = flow_training_grid(scheduler)
    idx = (u * scheduler.config.num_train_timesteps).long().clamp(0, grid_t.numel() - 1)
    return grid_t.to(u.device)[idx]


def sample_flow_timesteps(n: int, scheduler, sampling: FlowTimestepSampling | None = None, *,
                          generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """n rectified-flow training timesteps, (n,) float32: :func:`sample_flow_u` then
    :func:`flow_timesteps_from_u`. Every value is a member of the training grid."""
    s = sampling or FlowTimestepSampling()
    u = sample_flow_u(n, s.weighting_scheme, logit_mean=s.logit_mean, logit_std=s.logit_std,
                      mode_scale=s.mode_scale, generator=generator, device=device)
    return flow_timesteps_from_u(scheduler, u)


def _draw_timesteps(n: int, num_train_timesteps, timestep_sampling, generator, device) -> torch.Tensor:
    if hasattr(num_train_timesteps, "config"):  # the scheduler itself
        family = _scheduler_family(num_train_timesteps)
        T = num_train_timesteps.config.num_train_timesteps
    else:
        family, T = "ddpm", int(num_train_timesteps)
    if family == "flow":
        return sample_flow_timesteps(n, num_train_timesteps, timestep_sampling, generator=generator,
                                     device=device)
    if timestep_sampling is not None:
        raise ValueError("timestep_sampling applies to rectified-flow schedulers only; DDPM-family timesteps "
                         "are uniform integers")
    return sample_timesteps(n, T, generator=generator, device=device)


def pair_timesteps_and_noise(x0_pairs: torch.Tensor, num_train_timesteps, *, share: bool = True,
                             generator=None, timestep_sampling: FlowTimestepSampling | None = None):
    """Draw (t, ε) for a ``[winners; losers]`` batch of shape (2B, ...).

    ``num_train_timesteps``: an int T (t ~ U{0, …, T-1}, int64, as always) or the noise scheduler itself: a
    DDPM-family one draws the same way with its ``config.num_train_timesteps``; a rectified-flow one draws
    float timesteps on its training grid by ``timestep_sampling`` (:class:`FlowTimestepSampling`, default
    logit-normal(0, 1), :func:`sample_flow_timesteps`). With ``share`` (default) the loser reuses its
    winner's t and ε: ``t = [t_b; t_b]``, ``ε = [ε_b; ε_b]``. Returns ``t`` (2B,) and ``noise`` with the shape
    of ``x0_pairs``. t is drawn before ε, both from ``generator``.
    """
    n = x0_pairs.shape[0]
    if n % 2:
        raise ValueError(f"a [winners; losers] batch needs an even size, got {n}")
    # Draw where the generator lives (a CPU generator keeps runs reproducible across devices), then move.
    device = generator.device if generator is not None else x0_pairs.device
    if share:
        t = _draw_timesteps(n // 2, num_train_timesteps, timestep_sampling, generator, device).repeat(2)
        half = torch.randn((n // 2, *x0_pairs.shape[1:]), generator=generator, device=device)
        noise = half.repeat(2, *([1] * (x0_pairs.ndim - 1)))
    else:
        t = _draw_timesteps(n, num_train_timesteps, timestep_sampling, generator, device)
        noise = torch.randn(x0_pairs.shape, generator=generator, device=device)
    return t.to(x0_pairs.device), noise.to(device=x0_pairs.device, dtype=x0_pairs.dtype)


# ------------------------------------------------------------------------------------------- forward process
def _alphas_cumprod(scheduler, t: torch.Tensor, ndim: int) -> torch.Tensor:
    abar = scheduler.alphas_cumprod.to(device=t.device, dtype=torch.float32)[t]
    return abar.view(-1, *([1] * (ndim - 1)))


def noisy_sample_and_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
    """Forward process and regression target, by scheduler family. ``x0``, ``noise``: (N, ...); ``t``: (N,).

    DDPM family, by ``prediction_type``: ``x_t = sqrt(ᾱ_t) x0 + sqrt(1-ᾱ_t) ε``; target ε,
    ``v = sqrt(ᾱ_t) ε - sqrt(1-ᾱ_t) x0`` or x0 (t int64).
    Rectified flow (:func:`is_flow_scheduler`): ``x_t = (1-σ) x0 + σ ε``, target the velocity ``ε - x0``, with
    σ = :func:`flow_sigmas` of the float t (the grid's σ for a training-grid t, else t/T; ``timesteps = σ·T``
    on the shipped SD3/FLUX schedulers, shift included).
    Computed in fp32; ``x_t`` is cast back to ``x0.dtype``, the target stays fp32.
    """
    if _scheduler_family(scheduler) == "flow":
        sigma = flow_sigmas(scheduler, t).to(x0.device).view(-1, *([1] * (x0.ndim - 1)))
        x0f, nf = x0.float(), noise.float()
        x_t = (1.0 - sigma) * x0f + sigma * nf
        return x_t.to(x0.dtype), nf - x0f
    prediction_type = scheduler.config.prediction_type
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    abar = _alphas_cumprod(scheduler, t, x0.ndim)
    x0f, nf = x0.float(), noise.float()
    x_t = abar.sqrt() * x0f + (1 - abar).sqrt() * nf
    if prediction_type == "epsilon":
        target = nf
    elif prediction_type == "v_prediction":
        target = abar.sqrt() * nf - (1 - abar).sqrt() * x0f
    else:
        target = x0f
    return x_t.to(x0.dtype), target


def x0_coefficients(scheduler, t: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, b)`` with the clean-sample estimate :math:`\\hat x_0 = a\\, x_t - b\\, o` from the model output o at
    ``t`` (N,), each (N, 1, ..., 1) fp32 for ``ndim``-d samples: rectified flow (o = v) a = 1, b = σ; DDPM family by
    ``prediction_type``: ε: a = 1/sqrt(ᾱ), b = sqrt(1-ᾱ)/sqrt(ᾱ); v: a = sqrt(ᾱ), b = sqrt(1-ᾱ); x0 (``sample``):
    a = 0, b = -1."""
    shape = (-1, *([1] * (ndim - 1)))
    if _scheduler_family(scheduler) == "flow":
        sigma = flow_sigmas(scheduler, t).float().view(shape)
        return torch.ones_like(sigma), sigma
    prediction_type = scheduler.config.prediction_type
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    abar = _alphas_cumprod(scheduler, t, ndim)
    if prediction_type == "epsilon":
        return 1 / abar.sqrt(), (1 - abar).sqrt() / abar.sqrt()
    if prediction_type == "v_prediction":
        return abar.sqrt(), (1 - abar).sqrt()
    return torch.zeros_like(abar), -torch.ones_like(abar)


def per_sample_error(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean((target - prediction)^2)`` over every dim but the first, in fp32. Shape (N, ...) -> (N,)."""
    sq = (prediction.float() - target.float()).pow(2)
    return sq.reshape(sq.shape[0], -1).mean(dim=1)


def snr(scheduler, t: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio λ_t = ᾱ_t / (1 - ᾱ_t), shape (N,)."""
    abar = scheduler.alphas_cumprod.to(device=t.device, dtype=torch.float32)[t]
    return abar / (1 - abar)


def flow_weights(sigma: torch.Tensor, weighting: str = "none") -> torch.Tensor:
    """ω(σ) for rectified flow, shape of ``sigma`` (N,), float32, the math of diffusers'
    ``compute_loss_weighting_for_sd3``: ``none`` 1 (flow_grpo's Flow-DPO), ``sigma_sqrt`` ``σ^-2``,
    ``cosmap`` ``2 / (π (1 - 2σ + 2σ²))``.

    Here ω multiplies the **velocity** error, as in diffusers' FLUX script. Its SD3 script defaults to
    ``precondition_outputs=1``: it regresses ``x̂0 = x_t - σ v̂`` on x0, an error of ``σ² ·`` the velocity
    error (``x0 - x̂0 = σ (v̂ - v*)``), so ``sigma_sqrt`` there gives back the plain velocity error. A σ = 0
    makes ``sigma_sqrt`` inf; the training grid's smallest σ is about 1/T.
    """
    if weighting not in FLOW_WEIGHTINGS:
        raise ValueError(f"weighting must be one of {FLOW_WEIGHTINGS} for a rectified-flow scheduler, got "
                         f"{weighting!r}")
    sigma = sigma.float()
    if weighting == "sigma_sqrt":
        return sigma ** -2.0
    if weighting == "cosmap":
        return 2.0 / (math.pi * (1 - 2 * sigma + 2 * sigma ** 2))
    return torch.ones_like(sigma)


def timestep_weights(scheduler, t: torch.Tensor, weighting: str = "none",
                     snr_gamma: float = 5.0) -> torch.Tensor:
    """ω, shape (N,), the factor on the per-sample error, by scheduler family and ``prediction_type``.

    Rectified flow (:func:`is_flow_scheduler`): :data:`FLOW_WEIGHTINGS` (``none``, ``sigma_sqrt``,
    ``cosmap``) of σ = :func:`flow_sigmas` of t, see :func:`flow_weights`; ``snr``/``min_snr`` raise a
    one-line ValueError.
    DDPM family: :data:`WEIGHTINGS`, ω(λ_t) below; ``sigma_sqrt``/``cosmap`` raise a one-line ValueError.

    ``none``: 1 (Diffusion-DPO, MaPO and every official preference repo).
    ``snr``: turns the error into the x0-error ``mean((x0 - x̂0)²)``. With
    ``x0 - x̂0 = -sqrt(1-ᾱ_t)/sqrt(ᾱ_t) (ε - ε̂)`` and ``x0 - x̂0 = -sqrt(1-ᾱ_t) (v - v̂)``, that is ``1/λ_t``
    for ε-prediction, ``1/(λ_t + 1) = 1 - ᾱ_t`` for v-prediction and 1 for x0-prediction
    (λ_t = ᾱ_t/(1-ᾱ_t), :func:`snr`).
    ``min_snr``: Hang et al. 2023, the x0-error weighted by ``min(λ_t, γ)``: ``min(λ_t, γ)/λ_t`` (ε),
    ``min(λ_t, γ)/(λ_t + 1)`` (v), ``min(λ_t, γ)`` (x0), as diffusers' ``train_text_to_image.py`` with
    ``compute_snr``. A step with ᾱ_t = 0 (the last step of a zero-terminal-SNR schedule) gets weight 1.
    """
    if is_flow_scheduler(scheduler):
        return flow_weights(flow_sigmas(scheduler, t), weighting)
    if weighting not in WEIGHTINGS:
        family = " for a DDPM-family scheduler" if weighting in FLOW_WEIGHTINGS else ""
        raise ValueError(f"weighting must be one of {WEIGHTINGS}{family}, got {weighting!r}")
    if weighting == "none":
        return torch.ones(t.shape, device=t.device)
    s = snr(scheduler, t)
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        to_x0 = 1 / s
    else:
        to_x0 = 1 / (s + 1) if prediction_type == "v_prediction" else torch.ones_like(s)
    w = to_x0 if weighting == "snr" else torch.clamp(s, max=snr_gamma) * to_x0
    # ᾱ_t = 0 (zero terminal SNR): weight 1, as diffusers does
    return torch.where(s == 0, torch.ones_like(w), w)


def denoising_errors(
    denoiser: Denoiser,
    scheduler,
    x0: torch.Tensor,
    cond: Any,
    t: torch.Tensor,
    noise: torch.Tensor,
    *,
    weighting: str = "none",
    snr_gamma: float = 5.0,
) -> torch.Tensor:
    """Per-sample weighted error ``ω · mean((y - f(x_t, t, c))^2)`` with one denoiser call, y and ω by
    scheduler family (:func:`noisy_sample_and_target`, :func:`timestep_weights`). Shape (N,)."""
    x_t, target = noisy_sample_and_target(scheduler, x0, noise, t)
    prediction = denoiser(x_t, t, cond)
    return timestep_weights(scheduler, t, weighting, snr_gamma) * per_sample_error(prediction, target)


def preference_errors(
    model: Denoiser,
    scheduler,
    x0_pairs: torch.Tensor,
    cond: Any,
    *,
    reference: Denoiser | None = None,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    share_noise: bool = True,
    generator: torch.Generator | None = None,
    weighting: str = "none",
    snr_gamma: float = 5.0,
    timestep_sampling: FlowTimestepSampling | None = None,
) -> PairErrors:
    """Policy (with grad) and reference (no grad) errors of a ``[winners; losers]`` batch.

    ``x0_pairs``: (2B, ...) clean samples, winners first. ``cond``: conditioning for the 2B batch. One call of
    ``model`` and, when ``reference`` is given, one call of ``reference`` under ``torch.no_grad`` on the same
    ``(x_t, t, cond)``. Returns :class:`PairErrors` with (B,) tensors. Works for both scheduler families:
    with a rectified-flow scheduler the errors are velocity errors ``mean((v_θ - (ε - x0))²)`` and t is float.
    When ``t`` or ``noise`` is None they are drawn by :func:`pair_timesteps_and_noise` with the scheduler
    (``timestep_sampling`` for rectified flow only; None = logit-normal(0, 1)).
    """
    if t is None or noise is None:
        t_drawn, noise_drawn = pair_timesteps_and_noise(
            x0_pairs, scheduler, share=share_noise, generator=generator, timestep_sampling=timestep_sampling
        )
        t = t_drawn if t is None else t
        noise = noise_drawn if noise is None else noise
    x_t, target = noisy_sample_and_target(scheduler, x0_pairs, noise, t)
    w = timestep_weights(scheduler, t, weighting, snr_gamma)
    model_err = w * per_sample_error(model(x_t, t, cond), target)
    model_w, model_l = model_err.chunk(2)  # (B,), (B,)
    ref_w = ref_l = None
    if reference is not None:
        with torch.no_grad():
            ref_err = w * per_sample_error(reference(x_t, t, cond), target)
        ref_w, ref_l = ref_err.chunk(2)
    return PairErrors(model_w, model_l, ref_w, ref_l, timesteps=t.chunk(2)[0])
