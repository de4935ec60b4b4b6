"""The online objectives, registered by name like the pair objectives: ``objective: grpo`` (Flow-GRPO / DDPO's
clipped-ratio loss with Flow-GRPO's KL) and ``objective: nft`` (DiffusionNFT). Their math lives in
:mod:`diffalign.online.grpo`; here are their config sections and the callables the recipe
(:mod:`diffalign.training.online`) calls:

- ``grpo``: ``objective(log_prob (B,), old_log_prob (B,), advantages (B,), mean=, ref_mean=, std=)`` ->
  :func:`~diffalign.online.grpo.grpo_loss` with the config's ε, :math:`A_{max}` and β_KL;
- ``nft``: ``objective(velocity, old_velocity, x_t, x0, sigma, advantages, ref_velocity=)`` ->
  :func:`~diffalign.online.grpo.nft_loss` with the config's β, :math:`A_{max}` and β_KL.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..online.grpo import grpo_loss, nft_loss
from .base import register_objective


@dataclass
class GRPOConfig:
    clip_range: float = field(default=1e-4, metadata={
        "help": "ε of the clipped ratio clip(ρ, 1-ε, 1+ε) (flow_grpo and DDPO: 1e-4)."})
    adv_clip_max: float = field(default=5.0, metadata={"help": "Advantages are clipped to ±this (official: 5)."})
    kl_beta: float = field(default=0.04, metadata={
        "help": "β_KL of Flow-GRPO's KL to the reference (LoRA disabled) on the step means: 0.04 (GenEval, OCR) or "
                "0.01 (PickScore) in flow_grpo's configs; 0 = no KL (DDPO), and no reference forward."})

    def __post_init__(self):
        if not self.clip_range > 0:
            raise ValueError(f"clip_range: must be > 0, got {self.clip_range}")
        if not self.adv_clip_max > 0:
            raise ValueError(f"adv_clip_max: must be > 0, got {self.adv_clip_max}")
        if self.kl_beta < 0:
            raise ValueError(f"kl_beta: must be >= 0, got {self.kl_beta}")


@register_objective("grpo", GRPOConfig, needs_reference=True, online=True)
def build_grpo(config: GRPOConfig):
    """GRPO (Flow-GRPO, Liu et al. 2025; DDPO's PPO loss, Black et al. 2024): the clipped ratio on stored SDE/DDIM
    steps, advantages normalised per prompt."""

    def objective(log_prob, old_log_prob, advantages, *, mean=None, ref_mean=None, std=None):
        return grpo_loss(log_prob, old_log_prob, advantages, clip_range=config.clip_range,
                         adv_clip_max=config.adv_clip_max, kl_beta=config.kl_beta, mean=mean, ref_mean=ref_mean,
                         std=std)

    return objective


@dataclass
class NFTConfig:
    beta: float = field(default=1.0, metadata={
        "help": "β of the implicit policies v± (DiffusionNFT: 1.0, 0.1 for OCR)."})
    adv_clip_max: float = field(default=5.0, metadata={"help": "Advantages are clipped to ±this (official: 5)."})
    kl_beta: float = field(default=1e-4, metadata={
        "help": "β_KL of the velocity KL to the reference (LoRA disabled) (official: 1e-4); 0 = none."})
    old_decay_rate: float = field(default=0.001, metadata={
        "help": "The sampling ('old') policy follows the trained one after every rollout: old <- d·old + (1-d)·θ with "
                "d = min(old_decay_rate · max(updates - old_decay_flat, 0), old_decay_max) (official decay_type 1: "
                "0.001, 0, 0.5; type 2: 0.0075, 75, 0.999; type 0: d = 0, old = θ)."})
    old_decay_flat: int = 0
    old_decay_max: float = 0.5

    def __post_init__(self):
        if not self.beta > 0:
            raise ValueError(f"beta: must be > 0, got {self.beta}")
        if not self.adv_clip_max > 0:
            raise ValueError(f"adv_clip_max: must be > 0, got {self.adv_clip_max}")
        if self.kl_beta < 0:
            raise ValueError(f"kl_beta: must be >= 0, got {self.kl_beta}")
        if self.old_decay_rate < 0 or self.old_decay_flat < 0:
            raise ValueError("old_decay_rate: old_decay_rate and old_decay_flat must be >= 0")
        if not 0 <= self.old_decay_max < 1:
            raise ValueError(f"old_decay_max: must be in [0, 1), got {self.old_decay_max}")

    def old_decay(self, updates: int) -> float:
        """d after ``updates`` optimizer updates (``return_decay`` of ``train_nft_sd3.py`` L169-189@24af555)."""
        if updates < self.old_decay_flat:
            return 0.0
        return min((updates - self.old_decay_flat) * self.old_decay_rate, self.old_decay_max)


@register_objective("nft", NFTConfig, needs_reference=True, online=True)
def build_nft(config: NFTConfig):
    """DiffusionNFT (Zheng et al. 2025): likelihood-free online RL on forward-noised samples of the policy."""

    def objective(velocity, old_velocity, x_t, x0, sigma, advantages, *, ref_velocity=None):
        return nft_loss(velocity, old_velocity, x_t, x0, sigma, advantages, beta=config.beta,
                        adv_clip_max=config.adv_clip_max, kl_beta=config.kl_beta, ref_velocity=ref_velocity)

    return objective
