"""DeformPAM head: Diffusion-DPO alignment of a diffusion action policy and reward-guided action selection (RAS).

Training (``DeformPAMHead.loss``): for a batch of B pairs ``[winners; losers]`` (2B action chunks, same observation
twice) the package's likelihood layer (:func:`diffalign.likelihood.preference_errors`) draws one (t, ε) per pair,
shared by winner, loser, policy and reference, and returns per-sample errors; the loss is the chosen DPO form of
:mod:`diffalign.robot.objectives`.

Inference (RAS, ``xiaoxiaoxh/DeformPAM`` @ 976b297 ``PrimitiveDiffusion.predict``): sample N candidates from the
reference (or the aligned policy), score each with the implicit reward

.. math::  \\hat r(s, a) = -β \\frac{1}{M} \\sum_{m=1}^M ω(t_m) \\big[e_θ(a, t_m, ε_m, s) - e_{ref}(a, t_m, ε_m, s)\\big],
           \\qquad t_m \\sim U\\{0, …, ⌊T·\\text{frac}⌋ - 1\\}

(the low-noise tenth by default), execute the best and keep the rest as fallbacks in reward order. Within a draw, t_m
is shared by all candidates of a state and, by default, so is ε_m (common random numbers; DeformPAM draws ε per
candidate). Any ``reward_fn(obs, candidates) -> (B, N)`` (an oracle, a RAPL reward) can drive the same selector.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..likelihood import denoising_errors, pair_timesteps_and_noise, preference_errors
from ..objectives import ObjectiveOutput, PairErrors, dpo_metrics
from .configuration_deformpam import DeformPAMConfig
from .data import PreferencePairs
from .modeling_diffusion_policy import DiffusionActionPolicy
from .objectives import pair_logits, preference_losses_with_ties

RewardFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def frozen_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A deep copy in eval mode with every parameter frozen (the Diffusion-DPO reference)."""
    ref = copy.deepcopy(module).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


class DeformPAMHead:
    """Preference alignment of ``policy`` against a frozen reference (by default a copy of it, taken now).

    >>> head = DeformPAMHead(policy, DeformPAMConfig(form="deformpam", beta=100.0))
    >>> history = head.fit(pairs, seed=0)                     # Diffusion-DPO fine-tuning
    >>> selection = head.select(obs, generator=g)             # RAS: best of N reference samples
    """

    def __init__(self, policy: DiffusionActionPolicy, config: DeformPAMConfig | None = None,
                 reference: DiffusionActionPolicy | None = None):
        self.policy = policy
        self.config = config or DeformPAMConfig()
        self.reference = reference if reference is not None else frozen_copy(policy)

    # -- the two denoisers ----------------------------------------------------------------------------------
    def reference_denoiser(self) -> Callable:
        """ε̂_ref(x_t, t, obs). ``deformpam_encoder`` mode: the policy's head on the reference encoder's features."""
        if self.config.reference_mode == "frozen":
            return self.reference
        ref_encoder, head = self.reference.encoder, self.policy
        return lambda x_t, t, obs: head.denoise(x_t, t, ref_encoder(obs))

    # -- training ---------------------------------------------------------------------------------------------
    def pair_errors(self, obs: torch.Tensor, winners: torch.Tensor, losers: torch.Tensor, *,
                    generator: torch.Generator | None = None) -> PairErrors:
        """Errors of B pairs. ``obs`` (B, ...), ``winners``/``losers`` (B, H, Da) in world units."""
        policy = self.policy
        x0_pairs = policy.normalize_actions(torch.cat([winners, losers]))  # (2B, H, Da), [winners; losers]
        cond = torch.cat([obs, obs])  # (2B, ...)
        scheduler = policy.noise_scheduler
        if self.config.reference_mode == "frozen":
            return preference_errors(policy, scheduler, x0_pairs, cond, reference=self.reference,
                                     generator=generator, weighting=self.config.weighting)
        # DeformPAM parity: the reference term also goes through the trainable head, so it keeps its gradient.
        t, noise = pair_timesteps_and_noise(x0_pairs, scheduler.config.num_train_timesteps, generator=generator)
        model_err = denoising_errors(policy, scheduler, x0_pairs, cond, t, noise, weighting=self.config.weighting)
        ref_err = denoising_errors(self.reference_denoiser(), scheduler, x0_pairs, cond, t, noise,
                                   weighting=self.config.weighting)
        model_w, model_l = model_err.chunk(2)
        ref_w, ref_l = ref_err.chunk(2)
        return PairErrors(model_w, model_l, ref_w, ref_l, timesteps=t.chunk(2)[0])

    def loss(self, batch: PreferencePairs, *, generator: torch.Generator | None = None) -> ObjectiveOutput:
        """Mean loss over the valid pairs of ``batch`` (ties dropped or SFT), with the fixed DPO metric names."""
        cfg = self.config
        winners, losers = batch.winners_losers()
        errors = self.pair_errors(batch.obs, winners, losers, generator=generator)
        losses, valid = preference_losses_with_ties(
            errors.model_w, errors.model_l, errors.ref_w, errors.ref_l, batch.tie,
            beta=cfg.beta, form=cfg.form, tie_mode=cfg.tie_mode, sft_weight=cfg.sft_weight,
        )
        loss = losses.sum() / valid.sum().clamp(min=1.0)
        logits = pair_logits(errors.model_w, errors.model_l, errors.ref_w, errors.ref_l, beta=cfg.beta, form=cfg.form)
        strict = ~batch.tie
        metrics = dpo_metrics(logits[strict], _subset_errors(errors, strict)) if strict.any() else {}
        metrics["pairs/valid"] = float(valid.sum())
        return ObjectiveOutput(loss, losses, metrics)

    def fit(self, pairs: PreferencePairs, *, seed: int = 0, log_every: int = 0) -> list[dict[str, float]]:
        """AdamW on every trainable policy parameter for ``config.steps`` steps of ``config.batch_size`` pairs."""
        cfg = self.config
        if cfg.tie_mode == "drop" and bool(pairs.tie.all()):
            raise ValueError("every pair is a tie and tie_mode='drop': nothing to train on")
        g = torch.Generator().manual_seed(seed)
        params = [p for p in self.policy.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
        self.policy.train()
        history = []
        for step in range(cfg.steps):
            idx = torch.randint(0, len(pairs), (min(cfg.batch_size, len(pairs)),), generator=g)
            out = self.loss(pairs.subset(idx), generator=g)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            record = {"step": step, "loss": out.loss.item(), **out.metrics}
            history.append(record)
            if log_every and step % log_every == 0:
                print(" ".join(f"{k}={v:.4g}" for k, v in record.items()), flush=True)
        self.policy.eval()
        return history

    # -- inference --------------------------------------------------------------------------------------------
    def implicit_reward(self, obs: torch.Tensor, candidates: torch.Tensor, *,
                        generator: torch.Generator | None = None) -> torch.Tensor:
        """DeformPAM's implicit reward of each candidate, (B, N). See :func:`implicit_reward`."""
        cfg = self.config
        return implicit_reward(self.policy, self.reference_denoiser(), obs, candidates, beta=cfg.beta,
                               n_draws=cfg.n_draws, t_max_frac=cfg.t_max_frac,
                               share_noise_across_candidates=cfg.share_noise_across_candidates,
                               weighting=cfg.weighting, generator=generator)

    def select(self, obs: torch.Tensor, *, n_candidates: int | None = None, generator: torch.Generator | None = None,
               candidates: torch.Tensor | None = None, reward_fn: RewardFn | None = None) -> Selection:
        """RAS: sample N candidates from ``config.candidate_source`` (unless given), rank by ``reward_fn`` (default:
        the implicit reward) and return the best with the fallback order."""
        n = n_candidates or self.config.n_candidates
        if candidates is None:
            sampler = self.reference if self.config.candidate_source == "reference" else self.policy
            candidates = sampler.sample_candidates(obs, n, generator=generator)
        if reward_fn is None:
            rewards = self.implicit_reward(obs, candidates, generator=generator)
        else:
            rewards = reward_fn(obs, candidates)
        return select_by_reward(candidates, rewards)


def _subset_errors(errors: PairErrors, mask: torch.Tensor) -> PairErrors:
    pick = lambda x: None if x is None else x[mask]
    return PairErrors(pick(errors.model_w), pick(errors.model_l), pick(errors.ref_w), pick(errors.ref_l),
                      pick(errors.timesteps))


@torch.no_grad()
def implicit_reward(
    policy: DiffusionActionPolicy,
    reference: Callable,
    obs: torch.Tensor,
    candidates: torch.Tensor,
    *,
    beta: float = 100.0,
    n_draws: int = 100,
    t_max_frac: float = 0.1,
    share_noise_across_candidates: bool = True,
    weighting: str = "none",
    generator: torch.Generator | None = None,
    max_rows: int = 16384,
) -> torch.Tensor:
    """``r̂ = -β · mean_m ω(t_m)[e_θ - e_ref]`` for ``candidates`` (B, N, H, Da) in world units; returns (B, N).

    Per draw m: one ``t_m ~ U{0..⌊T·t_max_frac⌋-1}`` per state, shared by its N candidates, and one ε_m per state
    (shared across candidates) or per candidate. Policy and reference always see the same (t, ε). Draws are
    batched so that at most ``max_rows`` chunks go through the denoiser at once.
    """
    b, n = candidates.shape[:2]
    chunk_shape = candidates.shape[2:]
    x0 = policy.normalize_actions(candidates).reshape(b * n, *chunk_shape)  # (B*N, H, Da)
    obs_rep = obs.repeat_interleave(n, dim=0)  # (B*N, ...)
    t_hi = max(1, int(policy.config.num_train_timesteps * t_max_frac))
    scheduler = policy.noise_scheduler
    total = torch.zeros(b * n, device=candidates.device)
    per_call = max(1, max_rows // (b * n))
    done = 0
    while done < n_draws:
        k = min(per_call, n_draws - done)
        t = torch.randint(0, t_hi, (k, b), generator=generator).to(candidates.device)  # (k, B)
        t = t.repeat_interleave(n, dim=1).reshape(-1)  # (k*B*N,), shared by a state's candidates
        if share_noise_across_candidates:
            eps = torch.randn((k, b, 1, *chunk_shape), generator=generator).expand(k, b, n, *chunk_shape)
        else:
            eps = torch.randn((k, b, n, *chunk_shape), generator=generator)
        eps = eps.reshape(k * b * n, *chunk_shape).to(candidates.device)
        x0_k = x0.repeat(k, *([1] * len(chunk_shape)))  # (k*B*N, H, Da)
        obs_k = obs_rep.repeat(k, *([1] * (obs_rep.ndim - 1)))
        e_pol = denoising_errors(policy, scheduler, x0_k, obs_k, t, eps, weighting=weighting)
        e_ref = denoising_errors(reference, scheduler, x0_k, obs_k, t, eps, weighting=weighting)
        total += (e_pol - e_ref).view(k, b * n).sum(dim=0)
        done += k
    return (-beta * total / n_draws).view(b, n)


@dataclass
class Selection:
    """Best-of-N result: ``actions`` (B, H, Da) executed; ``index`` (B,); ``order`` (B, N) candidate indices by
    decreasing reward (``order[:, 1:]`` are the fallbacks); ``rewards`` (B, N); ``candidates`` (B, N, H, Da)."""

    actions: torch.Tensor
    index: torch.Tensor
    order: torch.Tensor
    rewards: torch.Tensor
    candidates: torch.Tensor


def select_by_reward(candidates: torch.Tensor, rewards: torch.Tensor) -> Selection:
    """Rank ``candidates`` (B, N, ...) by ``rewards`` (B, N), highest first (stable: ties keep sampling order)."""
    if rewards.shape != candidates.shape[:2]:
        raise ValueError(f"rewards {tuple(rewards.shape)} must match candidates' (B, N) {tuple(candidates.shape[:2])}")
    order = torch.sort(rewards, dim=1, descending=True, stable=True).indices  # (B, N)
    index = order[:, 0]
    actions = candidates[torch.arange(candidates.shape[0]), index]
    return Selection(actions, index, order, rewards, candidates)


class RewardGuidedSelector:
    """Best-of-N with any reward: ``sampler`` proposes N candidates, ``reward_fn(obs, candidates) -> (B, N)`` ranks.

    >>> selector = RewardGuidedSelector(reference_policy, oracle_reward, n_candidates=8)
    >>> selection = selector(obs, generator=g)
    """

    def __init__(self, sampler: DiffusionActionPolicy, reward_fn: RewardFn, n_candidates: int = 8):
        self.sampler, self.reward_fn, self.n_candidates = sampler, reward_fn, n_candidates

    def __call__(self, obs: torch.Tensor, *, generator: torch.Generator | None = None,
                 candidates: torch.Tensor | None = None) -> Selection:
        if candidates is None:
            candidates = self.sampler.sample_candidates(obs, self.n_candidates, generator=generator)
        return select_by_reward(candidates, self.reward_fn(obs, candidates))


def expected_max_of_n(values, n: int) -> np.ndarray:
    """Unbiased order-statistics estimate of E[max of n draws] from a pool of M ≥ n draws (last axis).

    .. math::  \\hat E_n = \\sum_{i=1}^{M} r_{(i)} \\binom{i-1}{n-1} / \\binom{M}{n}

    with ``r_(1) <= ... <= r_(M)`` the sorted pool: the average of the maximum over all n-subsets of the pool. For a
    fixed pool it is non-decreasing in n (every (n+1)-subset's max is at least the mean of its n-subsets' maxima).
    """
    v = np.sort(np.asarray(values, dtype=np.float64), axis=-1)
    m = v.shape[-1]
    if not 1 <= n <= m:
        raise ValueError(f"n must be in [1, {m}] for a pool of {m}, got {n}")
    i = np.arange(1, m + 1)
    # log C(i-1, n-1) - log C(M, n), with C(k, r) = 0 for k < r
    valid = i >= n
    log_w = np.full(m, -np.inf)
    lg = math.lgamma
    log_den = lg(m + 1) - lg(n + 1) - lg(m - n + 1)
    for k in np.flatnonzero(valid):
        ii = int(i[k])
        log_w[k] = lg(ii) - lg(n) - lg(ii - n + 1) - log_den
    return (v * np.exp(log_w)).sum(axis=-1)
