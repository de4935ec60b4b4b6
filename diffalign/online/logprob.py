"""One reverse step with its log-probability: the samplers of online RL (Flow-GRPO, DDPO).

Each function takes the model output of one denoising step (the velocity :math:`v_θ` of a rectified-flow
transformer, or the ε / v prediction of a DDPM-family U-Net: the outputs :mod:`diffalign.likelihood`'s
denoisers return), the current latent :math:`x` and the step's noise levels, and returns a :class:`StepOutput`
``(prev_sample, log_prob, mean, std)``:

- ``prev_sample`` (B, ...): the next, less noisy latent :math:`x' = μ + s\\,ε` (drawn with ``generator``), or
  the given ``prev_sample`` unchanged (re-scoring a stored trajectory);
- ``log_prob`` (B,): :math:`\\log \\mathcal N(x' ; μ, s^2)` **averaged** (not summed) over every dim but the
  batch, as the official code does; ``x'`` enters detached, so gradients flow through μ only;
- ``mean`` (B, ...): μ, a function of the model output (carries its gradient);
- ``std`` (B, 1, ..., 1): the official code's ``std_dev_t`` (see each function: for the Flow-GRPO SDE this is
  :math:`σ_t` **without** the :math:`\\sqrt{-Δ}` factor, the number its KL term divides by).

Everything is computed in fp32 (inputs are cast; ``prev_sample`` comes back fp32): the official code casts for
the same reason (bf16 overflows in μ, ``sd3_sde_with_logprob.py`` L34-38@ac4c86e).

Sources (read, restated from the math, not copied):

- Flow-GRPO SDE step: yifan123/flow_grpo ``flow_grpo/diffusers_patch/sd3_sde_with_logprob.py`` L35-70@ac4c86e
  (``sde_step_with_logprob``); CPS: the same file L70-89@54809b5 (``sde_type == 'cps'``).
- DDIM with η > 0: kvablack/ddpo-pytorch ``ddpo_pytorch/diffusers_patch/ddim_with_logprob.py``
  L92-190@1958463 (``ddim_step_with_logprob``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

SDE_TYPES = ("sde", "cps")
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


class StepOutput(NamedTuple):
    """One reverse step: ``prev_sample`` (B, ...), ``log_prob`` (B,), ``mean`` (B, ...),
    ``std`` (B, 1, ..., 1)."""

    prev_sample: torch.Tensor
    log_prob: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor


# ------------------------------------------------------------------------------------------------ helpers
def _column(value, batch: int, ndim: int, device) -> torch.Tensor:
    """A float, 0-d or (B,) tensor as fp32 (B, 1, ..., 1) (or (1, 1, ..., 1) for a scalar) on ``device``."""
    t = torch.as_tensor(value, dtype=torch.float32, device=device).reshape(-1)
    if t.numel() not in (1, batch):
        raise ValueError(f"expected a scalar or {batch} values, got shape {tuple(t.shape)}")
    return t.view(-1, *([1] * (ndim - 1)))


def draw_noise(shape: Sequence[int], generator=None, device=None) -> torch.Tensor:
    """Standard normal noise of ``shape``, fp32 on ``device``.

    ``generator``: None, one ``torch.Generator`` (drawn on the generator's device, then moved, as diffusers'
    ``randn_tensor`` does), or a list of B generators, one per sample (sample i's noise then depends on its
    own generator only, whatever the batch split).
    """
    shape = tuple(shape)
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        return torch.cat([draw_noise((1, *shape[1:]), g, device) for g in generator])
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32).to(device)


def gaussian_log_prob(sample: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """:math:`\\mathrm{mean}_{\\text{dims}}[-(x-μ)^2/(2s^2) - \\log s - \\log\\sqrt{2π}]`, (B, ...) -> (B,).

    ``std`` broadcasts against ``sample`` (e.g. (B, 1, ..., 1)). ``sample`` is used as given (callers detach
    it).
    """
    lp = -((sample - mean) ** 2) / (2 * std**2) - torch.log(std) - _LOG_SQRT_2PI
    return lp.mean(dim=tuple(range(1, lp.ndim)))


def _check_draw(prev_sample, generator):
    if prev_sample is not None and generator is not None:
        raise ValueError("pass either prev_sample (re-score a stored step) or generator (draw one), not both")


# --------------------------------------------------------------------------------------- rectified flow
def flow_sde_step(velocity: torch.Tensor, sigma, sigma_next, x: torch.Tensor, *, noise_level: float = 0.7,
                  prev_sample: torch.Tensor | None = None, generator=None, sde_type: str = "sde",
                  sigma_max: float | None = None) -> StepOutput:
    """Flow-GRPO's reverse step of the rectified flow :math:`x_σ = (1-σ) x_0 + σ ε` run as an SDE.

    Shapes: ``velocity`` :math:`v_θ(x, σ, c)` and ``x`` (B, ...); ``sigma`` σ and ``sigma_next`` σ' (σ' < σ,
    the scheduler's ``sigmas[i]``, ``sigmas[i+1]``): floats, 0-d or (B,) tensors; ``prev_sample`` (B, ...).
    ``sde_type="cps"`` dispatches to :func:`flow_cps_step` (``noise_level`` is then its a).

    With :math:`Δ = σ' - σ < 0` and the noise scale :math:`σ_t = a\\sqrt{σ / (1-σ)}` (a = ``noise_level``,
    0.7 in flow_grpo's ``config/base.py`` L54@ac4c86e), the Euler-Maruyama step of the reverse SDE
    :math:`dx = [v + \\tfrac{σ_t^2}{2σ}(x + (1-σ) v)]\\,dσ + σ_t\\, dw` (the score of the flow marginal is
    :math:`-(x + (1-σ) v)/σ`) is

    .. math::  μ = x\\,\\big(1 + \\tfrac{σ_t^2}{2σ} Δ\\big) + v\\,\\big(1 + \\tfrac{σ_t^2 (1-σ)}{2σ}\\big) Δ,
               \\qquad x' = μ + σ_t \\sqrt{-Δ}\\; ε,

    and ``log_prob`` is the Gaussian :math:`\\log\\mathcal N(x'; μ, σ_t^2 |Δ|)` averaged over dims
    (``sd3_sde_with_logprob.py`` L45-68@ac4c86e). ``std`` returned is :math:`σ_t` (the official ``std_dev_t``;
    the step's standard deviation is ``std * sqrt(-Δ)``).

    At σ = 1 the factor :math:`σ/(1-σ)` is infinite; the official code puts ``sigma_max = sigmas[1]`` in the
    denominator there (L44, L47). σ = 1 can only be the first step, where ``sigmas[1]`` is σ', so the default
    ``sigma_max=None`` uses σ' (identical); pass ``sigma_max`` to override.

    ``noise_level = 0`` gives the deterministic Euler (ODE) step :math:`x' = x + vΔ` (Flow-GRPO-Fast and
    MixGRPO run the steps outside the SDE window this way); ``log_prob`` is then undefined and returned as
    NaN.
    """
    if sde_type == "cps":
        if sigma_max is not None:
            raise ValueError("sigma_max only applies to sde_type='sde'")
        return flow_cps_step(velocity, sigma, sigma_next, x, noise_level=noise_level, prev_sample=prev_sample,
                             generator=generator)
    if sde_type != "sde":
        raise ValueError(f"sde_type must be one of {SDE_TYPES}, got {sde_type!r}")
    if noise_level < 0:
        raise ValueError(f"noise_level must be >= 0, got {noise_level}")
    _check_draw(prev_sample, generator)
    v, xs = velocity.float(), x.float()
    b, nd, dev = xs.shape[0], xs.ndim, xs.device
    s, s_next = _column(sigma, b, nd, dev), _column(sigma_next, b, nd, dev)
    if not bool((s_next < s).all()) or not bool((s > 0).all()) or not bool((s <= 1).all()):
        raise ValueError("flow_sde_step needs 0 < sigma <= 1 and sigma_next < sigma")
    dt = s_next - s
    s_denominator = torch.where(s == 1, s_next if sigma_max is None else torch.full_like(s, sigma_max), s)
    std_dev_t = noise_level * torch.sqrt(s / (1 - s_denominator))
    mean = xs * (1 + std_dev_t**2 / (2 * s) * dt) + v * (1 + std_dev_t**2 * (1 - s) / (2 * s)) * dt
    step_std = std_dev_t * torch.sqrt(-dt)
    if prev_sample is None:
        prev_sample = mean + step_std * draw_noise(mean.shape, generator, dev)
    else:
        prev_sample = prev_sample.float()
    if noise_level == 0:
        log_prob = torch.full((b,), float("nan"), device=dev)
    else:
        log_prob = gaussian_log_prob(prev_sample.detach(), mean, step_std)
    return StepOutput(prev_sample, log_prob, mean, std_dev_t.expand(b, *([1] * (nd - 1))))


def flow_cps_step(velocity: torch.Tensor, sigma, sigma_next, x: torch.Tensor, *, noise_level: float = 0.7,
                  prev_sample: torch.Tensor | None = None, generator=None) -> StepOutput:
    """Flow-GRPO's CPS step (coefficients-preserving sampling, ``sde_type='cps'``), same shapes as
    :func:`flow_sde_step`.

    With :math:`\\hat x_0 = x - σ v` and :math:`\\hat x_1 = x + (1-σ) v` (the predicted clean sample and
    noise) and the noise scale :math:`σ_t = σ' \\sin(aπ/2)` (a = ``noise_level``; the CPS paper uses 0.8):

    .. math::  μ = (1-σ')\\,\\hat x_0 + \\sqrt{σ'^2 - σ_t^2}\\;\\hat x_1, \\qquad x' = μ + σ_t\\, ε,

    so :math:`x'` has exactly the flow marginal's coefficients :math:`(1-σ')` on :math:`\\hat x_0` and σ' on
    the total noise. ``log_prob`` is the official one with **all constants removed**:
    :math:`-\\mathrm{mean}_{\\text{dims}}(x' - μ)^2` (no :math:`1/(2σ_t^2)`, no normaliser;
    ``sd3_sde_with_logprob.py`` L70-89@54809b5). σ_t depends on σ' only, so the dropped factor is a per-step
    constant: log-prob *differences* (the GRPO ratio) are the Gaussian ones scaled by :math:`2σ_t^2`.
    ``std`` returned is σ_t, the step's standard deviation.
    """
    if noise_level < 0:
        raise ValueError(f"noise_level must be >= 0, got {noise_level}")
    _check_draw(prev_sample, generator)
    v, xs = velocity.float(), x.float()
    b, nd, dev = xs.shape[0], xs.ndim, xs.device
    s, s_next = _column(sigma, b, nd, dev), _column(sigma_next, b, nd, dev)
    if not bool((s_next < s).all()) or not bool((s_next >= 0).all()) or not bool((s <= 1).all()):
        raise ValueError("flow_cps_step needs 0 <= sigma_next < sigma <= 1")
    std_dev_t = s_next * math.sin(noise_level * math.pi / 2)
    x0_hat = xs - s * v
    x1_hat = xs + (1 - s) * v
    mean = (1 - s_next) * x0_hat + torch.sqrt((s_next**2 - std_dev_t**2).clamp_min(0)) * x1_hat
    if prev_sample is None:
        prev_sample = mean + std_dev_t * draw_noise(mean.shape, generator, dev)
    else:
        prev_sample = prev_sample.float()
    sq = (prev_sample.detach() - mean) ** 2
    log_prob = -sq.mean(dim=tuple(range(1, nd)))
    return StepOutput(prev_sample, log_prob, mean, std_dev_t.expand(b, *([1] * (nd - 1))))


# ------------------------------------------------------------------------------------------ DDPM family
def ddim_step_with_logprob(model_output: torch.Tensor, scheduler, t, x: torch.Tensor, *, eta: float = 1.0,
                           prev_sample: torch.Tensor | None = None, generator=None,
                           prediction_type: str | None = None) -> StepOutput:
    """DDPO's DDIM step with η > 0 (DDIM paper Eq. 12 and 16) and its Gaussian log-probability.

    Shapes: ``model_output`` (ε, v or x0 prediction) and ``x`` :math:`x_t` (B, ...); ``t``: an int or (B,)
    int64 tensor of timesteps on the scheduler's inference grid (``scheduler.set_timesteps`` must have run:
    the previous timestep is :math:`t' = t - \\lfloor T / n \\rfloor`, T = ``num_train_timesteps``,
    n = ``num_inference_steps``, as diffusers' ``DDIMScheduler.step``); ``scheduler``: any scheduler with
    ``alphas_cumprod`` (a ``DDIMScheduler`` from the pipeline's config, as DDPO builds it).
    ``prediction_type`` defaults to the scheduler config's (``epsilon``, ``v_prediction`` or ``sample``).

    With :math:`\\bar α = \\bar α_t` and :math:`\\bar α' = \\bar α_{\\max(t', 0)}` (DDPO clamps t' to
    [0, T-1] before the look-up, so the last step uses :math:`\\bar α_0`, never ``final_alpha_cumprod``: the
    same as diffusers for ``set_alpha_to_one=False``, every SD1.x/SD2.x/SDXL config; with
    ``set_alpha_to_one=True`` diffusers would use ᾱ = 1 there, a zero-variance last step with no finite
    log-probability):

    .. math::  \\hat x_0 = (x - \\sqrt{1-\\bar α}\\, \\hat ε)/\\sqrt{\\bar α} \\;(ε)\\quad\\text{or}\\quad
               \\hat x_0 = \\sqrt{\\bar α} x - \\sqrt{1-\\bar α}\\, \\hat v,\\;
               \\hat ε = \\sqrt{\\bar α}\\, \\hat v + \\sqrt{1-\\bar α}\\, x \\;(v),

    .. math::  σ_t = η \\sqrt{\\tfrac{1-\\bar α'}{1-\\bar α}\\big(1 - \\tfrac{\\bar α}{\\bar α'}\\big)},
               \\qquad μ = \\sqrt{\\bar α'}\\, \\hat x_0 + \\sqrt{1 - \\bar α' - σ_t^2}\\; \\hat ε,
               \\qquad x' = μ + σ_t ε,

    ``log_prob`` = :math:`\\log\\mathcal N(x'; μ, σ_t^2)` averaged over dims, ``std`` = σ_t
    (``ddim_with_logprob.py`` L93-190@1958463). ``clip_sample`` in the scheduler config clamps
    :math:`\\hat x_0` (DDPO's default ``use_clipped_model_output=False``: :math:`\\hat ε` is not re-derived).
    """
    if eta <= 0:
        raise ValueError(f"eta must be > 0 for a log-probability (eta = 0 is the deterministic DDIM step), "
                         f"got {eta}")
    _check_draw(prev_sample, generator)
    if getattr(scheduler, "num_inference_steps", None) is None:
        raise ValueError("call scheduler.set_timesteps(n) first: the previous timestep is t - T // n")
    if getattr(scheduler.config, "thresholding", False):
        raise NotImplementedError("dynamic thresholding is not supported (no SD1.x/SDXL config uses it)")
    prediction_type = prediction_type or scheduler.config.prediction_type
    out, xs = model_output.float(), x.float()
    b, nd, dev = xs.shape[0], xs.ndim, xs.device
    t = torch.as_tensor(t, device=dev).long().reshape(-1).expand(b)
    num_train = scheduler.config.num_train_timesteps
    prev_t = (t - num_train // scheduler.num_inference_steps).clamp(0, num_train - 1)  # DDPO L93-97
    abar_all = scheduler.alphas_cumprod.to(device=dev, dtype=torch.float32)
    abar = abar_all[t].view(-1, *([1] * (nd - 1)))
    abar_prev = abar_all[prev_t].view(-1, *([1] * (nd - 1)))
    beta = 1 - abar
    if prediction_type == "epsilon":
        x0_hat, eps_hat = (xs - beta.sqrt() * out) / abar.sqrt(), out
    elif prediction_type == "v_prediction":
        x0_hat, eps_hat = abar.sqrt() * xs - beta.sqrt() * out, abar.sqrt() * out + beta.sqrt() * xs
    elif prediction_type == "sample":
        x0_hat, eps_hat = out, (xs - abar.sqrt() * out) / beta.sqrt()
    else:
        raise ValueError(f"prediction_type must be epsilon, v_prediction or sample, got {prediction_type!r}")
    if getattr(scheduler.config, "clip_sample", False):
        r = scheduler.config.clip_sample_range
        x0_hat = x0_hat.clamp(-r, r)
    variance = (1 - abar_prev) / beta * (1 - abar / abar_prev)
    std_dev_t = eta * variance.sqrt()
    mean = abar_prev.sqrt() * x0_hat + (1 - abar_prev - std_dev_t**2).clamp_min(0).sqrt() * eps_hat
    if prev_sample is None:
        prev_sample = mean + std_dev_t * draw_noise(mean.shape, generator, dev)
    else:
        prev_sample = prev_sample.float()
    log_prob = gaussian_log_prob(prev_sample.detach(), mean, std_dev_t)
    return StepOutput(prev_sample, log_prob, mean, std_dev_t)
