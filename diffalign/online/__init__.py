"""Online RL for diffusion models, the pure-math core: reverse steps that record log-probabilities
(Flow-GRPO's SDE and CPS steps for rectified flow, DDPO's DDIM step with η > 0), GRPO advantages and the
clipped-ratio loss with Flow-GRPO's KL, and DiffusionNFT's likelihood-free loss.

Like :mod:`diffalign.objectives`, the steps and losses are functions of tensors and model outputs; the rollout
(:mod:`~diffalign.online.rollout`) runs a denoiser through them and records the trajectory. The trainer lives above
(training layer).
"""

from .grpo import (
    OnlineLossOutput,
    flow_grpo_kl,
    group_advantages,
    grpo_loss,
    nft_loss,
    nft_optimality,
    sde_window,
    train_step_indices,
)
from .logprob import (
    SDE_TYPES,
    StepOutput,
    ddim_step_with_logprob,
    draw_noise,
    flow_cps_step,
    flow_sde_step,
    gaussian_log_prob,
)
from .rollout import Trajectory, rescore, rollout

__all__ = [
    "SDE_TYPES",
    "OnlineLossOutput",
    "StepOutput",
    "Trajectory",
    "ddim_step_with_logprob",
    "draw_noise",
    "flow_cps_step",
    "flow_grpo_kl",
    "flow_sde_step",
    "gaussian_log_prob",
    "group_advantages",
    "grpo_loss",
    "nft_loss",
    "nft_optimality",
    "rescore",
    "rollout",
    "sde_window",
    "train_step_indices",
]
