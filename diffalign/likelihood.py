"""The per-timestep ELBO term every objective is built on.

For a clean sample :math:`x_0`, a diffusion step :math:`t` and noise :math:`ε`, the forward process gives
:math:`x_t = \\sqrt{\\bar α_t}\\, x_0 + \\sqrt{1-\\bar α_t}\\, ε` and the denoiser's per-sample error is

.. math::  e_θ(x_0, t, ε, c) = ω(λ_t)\\; \\mathrm{mean}_{\\text{dims}}\\big[(y - f_θ(x_t, t, c))^2\\big]

where the target :math:`y` is ε (``epsilon``), :math:`v = \\sqrt{\\bar α_t} ε - \\sqrt{1-\\bar α_t} x_0`
(``v_prediction``) or :math:`x_0` (``sample``), and ω is 1 by default (what every official preference repo
uses), the conversion to an x0-error (``snr``) or min-SNR-γ (:func:`timestep_weights`).
Up to constants and weighting, :math:`-e` is the per-timestep term of the ELBO of :math:`\\log p_θ(x_0 | c)`
(Diffusion-DPO paper, Eq. 14). For v-prediction, ``||v - v̂||² = ||ε - ε̂||² / ᾱ_t``-style weighting is
implied; see ``docs``.

The denoiser is any callable ``denoiser(x_t, t, cond) -> prediction`` with the shape of ``x_t``: a diffusers
U-Net wrapped by :class:`diffalign.models.UNetDenoiser`, or an action MLP for robot policies. Shapes: ``x0``
is (N, ...), ``t`` is (N,) integer, ``cond`` is whatever the denoiser takes for a batch of N.

Preference pairs use the layout ``[winners; losers]`` along dim 0 (N = 2B). :func:`preference_errors` draws t
and noise once per pair (shared by winner and loser, as the official code does), runs the policy **once** on
the 2B batch and the reference **once** under ``torch.no_grad`` on exactly the same inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class PairErrors:
    """Per-sample denoising errors of a batch of B preference pairs, all of shape (B,).

    ``model_*`` carry gradients (policy), ``ref_*`` do not (reference, or ``None`` for reference-free objectives).
    ``timesteps`` (B,) are the diffusion steps the pair was noised at (shared by winner and loser by default).
    """

    model_w: torch.Tensor
    model_l: torch.Tensor
    ref_w: torch.Tensor | None = None
    ref_l: torch.Tensor | None = None
    timesteps: torch.Tensor | None = None


Denoiser = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
WEIGHTINGS = ("none", "snr", "min_snr")


def sample_timesteps(n: int, num_train_timesteps: int, *, generator=None, device=None) -> torch.Tensor:
    """t ~ U{0, ..., T-1}, shape (n,), int64 (the official code's ``torch.randint(0, T)``)."""
    return torch.randint(0, num_train_timesteps, (n,), generator=generator, device=device, dtype=torch.long)


def pair_timesteps_and_noise(x0_pairs: torch.Tensor, num_train_timesteps: int, *, share: bool = True,
                             generator=None):
    """Draw (t, ε) for a ``[winners; losers]`` batch of shape (2B, ...).

    With ``share`` (default) the loser reuses its winner's t and ε: ``t = [t_b; t_b]``, ``ε = [ε_b; ε_b]``.
    Returns ``t`` (2B,) and ``noise`` with the shape of ``x0_pairs``.
    """
    n = x0_pairs.shape[0]
    if n % 2:
        raise ValueError(f"a [winners; losers] batch needs an even size, got {n}")
    # Draw where the generator lives (a CPU generator keeps runs reproducible across devices), then move.
    device = generator.device if generator is not None else x0_pairs.device
    if share:
        t = sample_timesteps(n // 2, num_train_timesteps, generator=generator, device=device).repeat(2)
        half = torch.randn((n // 2, *x0_pairs.shape[1:]), generator=generator, device=device)
        noise = half.repeat(2, *([1] * (x0_pairs.ndim - 1)))
    else:
        t = sample_timesteps(n, num_train_timesteps, generator=generator, device=device)
        noise = torch.randn(x0_pairs.shape, generator=generator, device=device)
    return t.to(x0_pairs.device), noise.to(device=x0_pairs.device, dtype=x0_pairs.dtype)


def _alphas_cumprod(scheduler, t: torch.Tensor, ndim: int) -> torch.Tensor:
    abar = scheduler.alphas_cumprod.to(device=t.device, dtype=torch.float32)[t]
    return abar.view(-1, *([1] * (ndim - 1)))


def noisy_sample_and_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
    """Forward process and regression target for the scheduler's ``prediction_type``.

    ``x_t = sqrt(ᾱ_t) x0 + sqrt(1-ᾱ_t) ε``; target ε, ``v = sqrt(ᾱ_t) ε - sqrt(1-ᾱ_t) x0`` or x0. Computed in
    fp32 and cast back to ``x0.dtype``.
    """
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


def per_sample_error(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean((target - prediction)^2)`` over every dim but the first, in fp32. Shape (N, ...) -> (N,)."""
    sq = (prediction.float() - target.float()).pow(2)
    return sq.reshape(sq.shape[0], -1).mean(dim=1)


def snr(scheduler, t: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio λ_t = ᾱ_t / (1 - ᾱ_t), shape (N,)."""
    abar = scheduler.alphas_cumprod.to(device=t.device, dtype=torch.float32)[t]
    return abar / (1 - abar)


def timestep_weights(scheduler, t: torch.Tensor, weighting: str = "none",
                     snr_gamma: float = 5.0) -> torch.Tensor:
    """ω(λ_t), shape (N,), the factor applied to the per-sample error of the scheduler's ``prediction_type``.

    ``none``: 1 (Diffusion-DPO, MaPO and every official preference repo).
    ``snr``: turns the error into the x0-error ``mean((x0 - x̂0)²)``. With
    ``x0 - x̂0 = -sqrt(1-ᾱ_t)/sqrt(ᾱ_t) (ε - ε̂)`` and ``x0 - x̂0 = -sqrt(1-ᾱ_t) (v - v̂)``, that is ``1/λ_t``
    for ε-prediction, ``1/(λ_t + 1) = 1 - ᾱ_t`` for v-prediction and 1 for x0-prediction
    (λ_t = ᾱ_t/(1-ᾱ_t), :func:`snr`).
    ``min_snr``: Hang et al. 2023, the x0-error weighted by ``min(λ_t, γ)``: ``min(λ_t, γ)/λ_t`` (ε),
    ``min(λ_t, γ)/(λ_t + 1)`` (v), ``min(λ_t, γ)`` (x0), as diffusers' ``train_text_to_image.py`` with
    ``compute_snr``. A step with ᾱ_t = 0 (the last step of a zero-terminal-SNR schedule) gets weight 1.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
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
    """Per-sample weighted error ``ω(λ_t) · mean((y - f(x_t, t, c))^2)`` with one denoiser call.
    Shape (N,)."""
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
) -> PairErrors:
    """Policy (with grad) and reference (no grad) errors of a ``[winners; losers]`` batch.

    ``x0_pairs``: (2B, ...) clean samples, winners first. ``cond``: conditioning for the 2B batch. One call of
    ``model`` and, when ``reference`` is given, one call of ``reference`` under ``torch.no_grad`` on the same
    ``(x_t, t, cond)``. Returns :class:`PairErrors` with (B,) tensors.
    """
    if t is None or noise is None:
        t_drawn, noise_drawn = pair_timesteps_and_noise(
            x0_pairs, scheduler.config.num_train_timesteps, share=share_noise, generator=generator
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
