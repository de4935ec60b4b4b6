"""Deterministic(ish) DDIM inversion of clean latents, per sample, as InPO uses it.

Levels follow the official InPO code (diffusers 0.20 ``DDIMInverseScheduler``, ``steps_offset=1``, ``leading``,
10 steps): ``[-99, 1, 101, ..., 801]``. One inversion step takes a latent at level k to level n = k + stride
(the level "-99" has ᾱ = ᾱ_0, ``set_alpha_to_one=False``):

.. math::

    \\hat x_0 = \\frac{x_k - \\sqrt{1-\\bar α_k}\\, ε_θ(x_k, k)}{\\sqrt{\\bar α_k}}, \\qquad
    x_n = \\sqrt{\\bar α_n}\\, \\hat x_0 + \\sqrt{1-\\bar α_n}\\, ε_θ(x_k, k) + η\\, σ_{n,k}\\, ξ

with :math:`σ_{n,k}^2 = \\frac{1-\\bar α_k}{1-\\bar α_n}(1 - \\bar α_n/\\bar α_k)` (DDIM's η=1 variance) and
η = 0.1 in InPO. Sample i takes every step with k < t_i, so it ends at level :math:`L(t_i) = \\max\\{k < t_i\\} + 100`
after :math:`n(t_i) = \\#\\{k < t_i\\}` steps (6.382 on average for t ~ U{0..999}). Deviation from the official code:
the U-Net is called at ``max(k, 0)`` instead of the negative timestep -99.
"""

from __future__ import annotations

import torch


def inversion_levels(num_train_timesteps: int = 1000, num_inference_steps: int = 10, steps_offset: int = 1):
    """Start levels of the inversion steps, ascending: ``[-99, 1, 101, ..., 801]`` for (1000, 10, 1)."""
    stride = num_train_timesteps // num_inference_steps
    starts = [i * stride + steps_offset for i in range(num_inference_steps)]  # [1, 101, ..., 901]
    return [starts[0] - stride] + starts[:-1], stride


def _abar(scheduler, level: int) -> torch.Tensor:
    ac = scheduler.alphas_cumprod.to(torch.float32)
    return ac[level] if level >= 0 else ac[0]


def ddim_inversion_step(eps: torch.Tensor, x: torch.Tensor, abar_k: torch.Tensor, abar_n: torch.Tensor):
    """One DDIM inversion step from level k to level n (ε-prediction), all in fp32."""
    x0_hat = (x - (1 - abar_k).sqrt() * eps) / abar_k.sqrt()
    return abar_n.sqrt() * x0_hat + (1 - abar_n).sqrt() * eps


@torch.no_grad()
def ddim_invert(denoiser, scheduler, x0: torch.Tensor, cond, t: torch.Tensor, *, num_inference_steps: int = 10,
                eta: float = 0.1, generator: torch.Generator | None = None):
    """Invert ``x0`` (N, ...) toward per-sample levels ``t`` (N,). Returns ``(x_inv, level)``: the inverted latents
    (fp32) and the level L(t_i) each one reached. One batched denoiser call per step any sample still takes."""
    if scheduler.config.prediction_type != "epsilon":
        raise ValueError("DDIM inversion here supports epsilon-prediction models (InPO asserts epsilon)")
    starts, stride = inversion_levels(scheduler.config.num_train_timesteps, num_inference_steps)
    x = x0.float().clone()
    level = torch.full_like(t, starts[0])
    shape = (-1, *([1] * (x0.ndim - 1)))
    for k in starts:
        active = t > k  # (N,) samples whose target level is above k take this step
        if not active.any():
            break
        n = k + stride
        eps = denoiser(x.to(x0.dtype), torch.full_like(t, max(k, 0)), cond).float()
        a_k, a_n = _abar(scheduler, k), _abar(scheduler, n)
        x_next = ddim_inversion_step(eps, x, a_k, a_n)
        if eta > 0:
            var = (1 - a_k) / (1 - a_n) * (1 - a_n / a_k)
            xi = torch.randn(x.shape, generator=generator, device=generator.device if generator else x.device)
            x_next = x_next + eta * var.sqrt() * xi.to(x.device)
        x = torch.where(active.view(shape), x_next, x)
        level = torch.where(active, torch.full_like(t, n), level)
    return x, level


def implied_noise(scheduler, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """ε̃ = (x_t − √ᾱ_t x0) / √(1 − ᾱ_t), so that √ᾱ_t x0 + √(1 − ᾱ_t) ε̃ = x_t exactly (fp32)."""
    abar = scheduler.alphas_cumprod.to(device=t.device, dtype=torch.float32)[t].view(-1, *([1] * (x0.ndim - 1)))
    return (x_t.float() - abar.sqrt() * x0.float()) / (1 - abar).sqrt()


@torch.no_grad()
def ddim_sample_back(denoiser, scheduler, x: torch.Tensor, cond, level: torch.Tensor, *,
                     num_inference_steps: int = 10):
    """Deterministic DDIM sampling (η = 0) from per-sample ``level`` down the same grid to level "-99" (ᾱ_0);
    the inverse of :func:`ddim_invert` with η = 0 up to the DDIM inversion approximation."""
    starts, stride = inversion_levels(scheduler.config.num_train_timesteps, num_inference_steps)
    x = x.float().clone()
    shape = (-1, *([1] * (x.ndim - 1)))
    for k in reversed(starts):
        n = k + stride
        active = level >= n
        if not active.any():
            continue
        eps = denoiser(x, torch.full_like(level, n), cond).float()
        a_n, a_k = _abar(scheduler, n), _abar(scheduler, k)
        x_prev = ddim_inversion_step(eps, x, a_n, a_k)  # same algebra, from n down to k
        x = torch.where(active.view(shape), x_prev, x)
    return x
