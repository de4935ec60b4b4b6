"""GRPO for diffusion (Flow-GRPO, DDPO's PPO loss) and DiffusionNFT: pure functions of rewards,
log-probabilities and model outputs.

- :func:`group_advantages`: rewards of G images per prompt -> advantages (per-prompt mean, per-prompt or
  global std), flow_grpo ``flow_grpo/stat_tracking.py`` L11-55@ac4c86e and ``scripts/train_sd3.py``
  L754-782@ac4c86e.
- :func:`grpo_loss`: the clipped-ratio surrogate plus Flow-GRPO's KL to the reference on the step means,
  ``scripts/train_sd3.py`` L880-923@ac4c86e (DDPO ``scripts/train.py`` L538-566@1958463 is the same loss
  without the KL).
- :func:`sde_window`, :func:`train_step_indices`: which steps of a trajectory are SDE steps / trained.
- :func:`nft_loss`: DiffusionNFT's likelihood-free loss on forward-noised samples, NVlabs/DiffusionNFT
  ``scripts/train_nft_sd3.py`` L910-975@24af555.

The reference of the KL terms is the policy with its LoRA adapters disabled (no second copy): the trainer runs
the denoiser once more under ``torch.no_grad()`` with adapters off and passes the means / velocities here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class OnlineLossOutput:
    """``loss``: 0-d; ``losses``: (B,) per-sample loss terms (the mean of which is ``loss``); ``metrics``:
    floats."""

    loss: torch.Tensor
    losses: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)


# -------------------------------------------------------------------------------------------- advantages
def _group_index(group_ids, n: int) -> torch.Tensor:
    """(N,) int64 group index 0..G-1 from a tensor of ids or a sequence of hashables (e.g. prompts)."""
    if isinstance(group_ids, torch.Tensor):
        ids = group_ids.reshape(-1)
        if ids.numel() != n:
            raise ValueError(f"{ids.numel()} group ids for {n} rewards")
        return torch.unique(ids.cpu(), return_inverse=True)[1]
    ids = list(group_ids)
    if len(ids) != n:
        raise ValueError(f"{len(ids)} group ids for {n} rewards")
    index: dict = {}
    return torch.tensor([index.setdefault(g, len(index)) for g in ids], dtype=torch.long)


def group_advantages(rewards: torch.Tensor, group_ids, *, per_prompt: bool = True, global_std: bool = True,
                     eps: float = 1e-4) -> torch.Tensor:
    """GRPO advantages, (N,) -> (N,), computed in float64 and returned in ``rewards``' float dtype.

    ``rewards`` :math:`r_i` (N,); ``group_ids`` (N,): a tensor of ids or a sequence of hashables (the
    prompts), equal for the G images of one prompt. With :math:`\\bar r_{g(i)}` the mean of i's group and
    population standard deviations (ddof 0, as numpy's ``np.std``):

    - ``per_prompt`` (flow_grpo ``config.per_prompt_stat_tracking``, True in every shipped config):
      :math:`A_i = (r_i - \\bar r_{g(i)}) / (s + ε)`, with s the std of all N rewards if ``global_std``
      (``config.sample.global_std``, True in every shipped flow_grpo config, ``config/base.py`` L52@ac4c86e)
      else the std of i's group (the GRPO paper's form) (``stat_tracking.py`` L22-31@ac4c86e);
    - otherwise :math:`A_i = (r_i - \\bar r) / (\\mathrm{std}(r) + ε)` over the whole batch
      (``train_sd3.py`` L782@ac4c86e).

    ε = 1e-4 as the official code. A group whose rewards are all equal gets A = 0 (flow_grpo then drops those
    samples from training: ``train_sd3.py`` L796-816, the trainer's business). ``rewards`` must be gathered
    over all processes first: groups are split across ranks.
    """
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be (N,), got {tuple(rewards.shape)}")
    n = rewards.shape[0]
    r = rewards.detach().to(torch.float64).cpu()
    if not per_prompt:
        adv = (r - r.mean()) / (r.std(unbiased=False) + eps)
    else:
        idx = _group_index(group_ids, n)
        g = int(idx.max()) + 1
        count = torch.zeros(g, dtype=torch.float64).index_add_(0, idx, torch.ones_like(r))
        mean = torch.zeros(g, dtype=torch.float64).index_add_(0, idx, r) / count
        centred = r - mean[idx]
        if global_std:
            std = r.std(unbiased=False)
        else:
            var = torch.zeros(g, dtype=torch.float64).index_add_(0, idx, centred**2) / count
            std = var.sqrt()[idx]
        adv = centred / (std + eps)
    dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    return adv.to(device=rewards.device, dtype=dtype)


# -------------------------------------------------------------------------------------------------- GRPO
def grpo_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, *,
              clip_range: float = 1e-4, adv_clip_max: float | None = 5.0, kl_beta: float = 0.0,
              mean: torch.Tensor | None = None, ref_mean: torch.Tensor | None = None,
              std: torch.Tensor | float | None = None) -> OnlineLossOutput:
    """The PPO-clip surrogate of Flow-GRPO / DDPO for one trajectory step, plus Flow-GRPO's KL.

    Shapes: ``log_prob`` :math:`\\log p_θ(x_{t-1} | x_t)` (B,) (with gradient, from the samplers in
    :mod:`diffalign.online.logprob` re-scoring the stored step); ``old_log_prob`` (B,) recorded at rollout;
    ``advantages`` (B,) from :func:`group_advantages`. For the KL: ``mean`` μ_θ (B, ...) and ``ref_mean``
    μ_ref (B, ...) of the same step under the policy and the reference (adapters disabled), ``std`` the
    sampler's ``std`` (B, 1, ..., 1), (B,) or a float.

    .. math::  A = \\mathrm{clip}(A, \\pm A_{max}), \\quad ρ = \\exp(\\log p_θ - \\log p_{old}), \\quad
               L_{pg} = \\mathrm{mean}_B \\max\\big(-A ρ,\\; -A\\, \\mathrm{clip}(ρ, 1-ε, 1+ε)\\big),

    .. math::  L = L_{pg} + β_{KL}\\; \\mathrm{mean}_B
               \\frac{\\mathrm{mean}_{\\text{dims}} (μ_θ - μ_{ref})^2}{2\\, σ_t^2}

    (``train_sd3.py`` L881-897@ac4c86e; ε = ``clip_range`` 1e-4 and :math:`A_{max}` = ``adv_clip_max`` 5 in
    ``config/base.py`` L84-86@ac4c86e; β_KL = ``kl_beta``, 0.04 or 0.01 in ``config/grpo.py``; DDPO's
    ``scripts/train.py`` L539-551@1958463 is :math:`L_{pg}` with ε = 1e-4 and :math:`A_{max}` = 5 too). For
    the Flow-GRPO SDE step the KL is that of the two Gaussians up to the step factor :math:`|Δ|` (the official
    code divides by :math:`σ_t^2`, not by the step variance :math:`σ_t^2|Δ|`; kept as is).
    ``adv_clip_max=None`` skips the advantage clip. ``old_log_prob`` and ``ref_mean`` are detached.

    ``losses`` (B,) = per-sample :math:`\\max(\\cdot)` + β_KL · per-sample KL. Metrics (the official names):
    ``policy_loss``, ``kl_loss`` (when β_KL > 0), ``approx_kl`` = :math:`\\tfrac12\\mathrm{mean}(\\log p_θ -
    \\log p_{old})^2`, ``clipfrac`` (:math:`|ρ-1| > ε`), ``clipfrac_gt_one``, ``clipfrac_lt_one``,
    ``ratio_mean``, ``ratio_max``, ``ratio_min``, ``advantage_abs_mean``.
    """
    if log_prob.ndim != 1 or old_log_prob.shape != log_prob.shape or advantages.shape != log_prob.shape:
        raise ValueError("log_prob, old_log_prob and advantages must all be (B,), got "
                         f"{tuple(log_prob.shape)}, {tuple(old_log_prob.shape)}, {tuple(advantages.shape)}")
    adv = advantages.to(log_prob.dtype)
    if adv_clip_max is not None:
        adv = adv.clamp(-adv_clip_max, adv_clip_max)
    log_ratio = log_prob - old_log_prob.detach()
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    per_sample = torch.maximum(unclipped, clipped)
    policy_loss = per_sample.mean()
    losses, loss = per_sample, policy_loss
    metrics = {"policy_loss": float(policy_loss.detach())}
    if kl_beta > 0:
        if mean is None or ref_mean is None or std is None:
            raise ValueError("kl_beta > 0 needs mean, ref_mean and std (the sampler's outputs)")
        kl = flow_grpo_kl(mean, ref_mean, std)
        kl_loss = kl.mean()
        losses = per_sample + kl_beta * kl
        loss = policy_loss + kl_beta * kl_loss
        metrics["kl_loss"] = float(kl_loss.detach())
    with torch.no_grad():
        r = ratio.detach()
        metrics.update(
            loss=float(loss.detach()),
            approx_kl=float(0.5 * (log_ratio.detach() ** 2).mean()),
            clipfrac=float(((r - 1.0).abs() > clip_range).float().mean()),
            clipfrac_gt_one=float((r - 1.0 > clip_range).float().mean()),
            clipfrac_lt_one=float((1.0 - r > clip_range).float().mean()),
            ratio_mean=float(r.mean()), ratio_max=float(r.max()), ratio_min=float(r.min()),
            advantage_abs_mean=float(adv.detach().abs().mean()),
        )
    return OnlineLossOutput(loss, losses, metrics)


def flow_grpo_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std) -> torch.Tensor:
    """Per-sample :math:`\\mathrm{mean}_{\\text{dims}}(μ_θ - μ_{ref})^2 / (2σ_t^2)`, (B, ...) -> (B,)
    (``train_sd3.py`` L895@ac4c86e). ``std``: (B, 1, ..., 1), (B,), 0-d or a float; ``ref_mean`` detached."""
    sq = (mean.float() - ref_mean.detach().float()) ** 2
    per = sq.mean(dim=tuple(range(1, sq.ndim)))
    s = torch.as_tensor(std, dtype=torch.float32, device=per.device).reshape(-1)
    if s.numel() not in (1, per.shape[0]):
        raise ValueError(f"std must hold 1 or {per.shape[0]} values, got {tuple(s.shape)}")
    return per / (2 * s**2)


# ------------------------------------------------------------------------------------ trajectory windows
def train_step_indices(num_steps: int, timestep_fraction: float = 1.0) -> list[int]:
    """The first ``int(num_steps · timestep_fraction)`` step indices, trained in order (``train_sd3.py`` L345,
    L864@ac4c86e; the shipped configs use 0.99, which leaves out the last, sharpest step for up to 100
    steps)."""
    n = int(num_steps * timestep_fraction)
    if not 1 <= n <= num_steps:
        raise ValueError(f"timestep_fraction {timestep_fraction} leaves {n} of {num_steps} steps")
    return list(range(n))


def sde_window(num_steps: int, window_size: int = 0, window_range: tuple[int, int] | None = None, *,
               generator: torch.Generator | None = None) -> tuple[int, int]:
    """The half-open range ``(start, end)`` of steps run as SDE (and trained); the others run the ODE
    (``noise_level = 0``). Flow-GRPO-Fast / Flow-GRPO's Qwen-Image pipeline (``sde_window_size``,
    ``sde_window_range``; ``qwenimage_edit_plus_pipeline_with_logprob.py``, the ``sde_window`` block,
    @9dcdc35): ``window_size = 0`` -> every step but the last, ``(0, num_steps - 1)``; otherwise start uniform
    in ``[lo, hi - window_size]`` (``window_range = (lo, hi)``, default ``(0, num_steps)``), end = start +
    size. The official code draws with Python's ``random`` seeded by the process index; here with
    ``generator``.
    """
    if window_size <= 0:
        return 0, num_steps - 1
    lo, hi = window_range if window_range is not None else (0, num_steps)
    if not 0 <= lo <= hi - window_size or hi > num_steps:
        raise ValueError(f"window of {window_size} steps does not fit in {(lo, hi)} of {num_steps} steps")
    start = int(torch.randint(lo, hi - window_size + 1, (1,), generator=generator))
    return start, start + window_size


# ------------------------------------------------------------------------------------------ DiffusionNFT
def nft_optimality(advantages: torch.Tensor, adv_clip_max: float = 5.0) -> torch.Tensor:
    """DiffusionNFT's reward weight :math:`r = \\mathrm{clip}(\\mathrm{clip}(A, \\pm A_{max}) / A_{max} / 2 +
    ½, 0, 1)`, (B,) -> (B,) (``train_nft_sd3.py`` L910-929@24af555)."""
    a = advantages.clamp(-adv_clip_max, adv_clip_max)
    return (a / adv_clip_max / 2.0 + 0.5).clamp(0.0, 1.0)


def nft_loss(velocity: torch.Tensor, old_velocity: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor, sigma,
             advantages: torch.Tensor, *, beta: float = 1.0, adv_clip_max: float = 5.0, kl_beta: float = 0.0,
             ref_velocity: torch.Tensor | None = None, weight_min: float = 1e-5) -> OnlineLossOutput:
    """DiffusionNFT (Zheng et al., "DiffusionNFT: Online Diffusion Reinforcement with Forward Process"), the
    likelihood-free online objective on forward-noised clean samples.

    Shapes: ``velocity`` :math:`v_θ(x_t, σ, c)` (B, ...) with gradient; ``old_velocity``
    :math:`v_{old}` (B, ...) of the sampling policy (detached here); ``x0`` (B, ...) the clean latents of the
    policy's own samples (any sampler); ``x_t = (1-σ) x0 + σ ε`` (B, ...)
    (:func:`diffalign.likelihood.noisy_sample_and_target`); ``sigma`` σ: float, 0-d or (B,); ``advantages``
    (B,) from :func:`group_advantages`; ``ref_velocity`` (B, ...) the reference (adapters disabled), for the
    KL.

    .. math::  r = \\mathrm{clip}(A, \\pm A_{max}) / (2A_{max}) + ½, \\quad
               v^+ = β v_θ + (1-β) v_{old}, \\quad v^- = (1+β) v_{old} - β v_θ, \\quad
               \\hat x_0(v) = x_t - σ v,

    .. math::  \\ell^\\pm = \\mathrm{mean}_{\\text{dims}} \\frac{(\\hat x_0(v^\\pm) - x_0)^2}{w^\\pm}, \\quad
               w^\\pm = \\mathrm{sg}\\big[\\max(\\mathrm{mean}_{\\text{dims}}
               |\\hat x_0(v^\\pm) - x_0|, 10^{-5})\\big],

    .. math::  L = A_{max}\\; \\mathrm{mean}_B \\big[(r\\,\\ell^+ + (1-r)\\,\\ell^-)/β\\big]
               + β_{KL}\\; \\mathrm{mean}_B\\, \\mathrm{mean}_{\\text{dims}} (v_θ - v_{ref})^2

    (``train_nft_sd3.py`` L910-970@24af555; β = ``config.beta`` 1.0 or 0.1, β_KL = ``config.train.beta`` 1e-4,
    ``adv_clip_max`` 5 in ``config/base.py`` L84-89 and ``config/nft.py``@24af555). The adaptive weights w are
    computed in float64 as the official code does. The official ``adv_mode`` variants (positive_only, …) are
    transformations of A before this call.

    ``losses`` (B,): per-sample :math:`A_{max}(r\\ell^+ + (1-r)\\ell^-)/β` (+ β_KL · per-sample KL). Metrics:
    ``policy_loss``, ``kl_div`` (when ``ref_velocity`` is given), ``old_deviate`` = mean :math:`(v_θ -
    v_{old})^2`, ``r_mean``.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    v, v_old = velocity.float(), old_velocity.detach().float()
    xt, x0f = x_t.float(), x0.float()
    b, nd = xt.shape[0], xt.ndim
    dims = tuple(range(1, nd))
    s = torch.as_tensor(sigma, dtype=torch.float32, device=xt.device).reshape(-1)
    if s.numel() not in (1, b):
        raise ValueError(f"sigma must hold 1 or {b} values, got {tuple(s.shape)}")
    s = s.view(-1, *([1] * (nd - 1)))
    r = nft_optimality(advantages.float(), adv_clip_max)
    v_pos = beta * v + (1 - beta) * v_old
    v_neg = (1 + beta) * v_old - beta * v
    x0_pos, x0_neg = xt - s * v_pos, xt - s * v_neg
    with torch.no_grad():
        w_pos = (x0_pos.double() - x0f.double()).abs().mean(dim=dims, keepdim=True).clamp_min(weight_min)
        w_neg = (x0_neg.double() - x0f.double()).abs().mean(dim=dims, keepdim=True).clamp_min(weight_min)
    pos = ((x0_pos - x0f) ** 2 / w_pos).mean(dim=dims)
    neg = ((x0_neg - x0f) ** 2 / w_neg).mean(dim=dims)
    per_sample = (r * pos / beta + (1.0 - r) * neg / beta) * adv_clip_max
    policy_loss = per_sample.mean()
    losses, loss = per_sample, policy_loss
    metrics = {"policy_loss": float(policy_loss.detach())}
    if ref_velocity is not None:
        kl = ((v - ref_velocity.detach().float()) ** 2).mean(dim=dims)
        metrics["kl_div"] = float(kl.detach().mean())
        if kl_beta > 0:
            losses = per_sample + kl_beta * kl
            loss = policy_loss + kl_beta * kl.mean()
    elif kl_beta > 0:
        raise ValueError("kl_beta > 0 needs ref_velocity")
    with torch.no_grad():
        metrics.update(loss=float(loss.detach()), old_deviate=float(((v - v_old) ** 2).mean()),
                       r_mean=float(r.mean()))
    return OnlineLossOutput(loss, losses, metrics)


