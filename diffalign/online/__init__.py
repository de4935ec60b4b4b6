"""Online RL for diffusion models, the pure-math core: reverse steps that record log-probabilities
(Flow-GRPO's SDE and CPS steps for rectified flow, DDPO's DDIM step with η > 0), GRPO advantages and the
clipped-ratio loss with Flow-GRPO's KL, and DiffusionNFT's likelihood-free loss.

Like :mod:`diffalign.objectives`, the steps and losses are functions of tensors and model outputs; the rollout
(:mod:`~diffalign.online.rollout`) runs a denoiser through them and records the trajectory. The trainer lives above
(training layer).

Rewards in process (:mod:`~diffalign.online.rewards`): weighted sums of :mod:`diffalign.evaluators`
scorers (imported when a :class:`Rewards` is built), or scorers served over HTTP by another process
(:mod:`~diffalign.online.reward_server`: JSON with PNG images, no pickle). The reward-hacking monitor
(:mod:`~diffalign.online.monitor`): image artefact statistics and :class:`HackingMonitor`.
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
from .monitor import (
    ARTEFACT_STATS,
    HackingMonitor,
    MonitorVerdict,
    artefact_record,
    artefact_stats,
    background_emptiness,
    grid_energy,
    high_frequency_energy,
    saturation,
)
from .rewards import Rewards, RewardSpec, RewardTerm, to_pil_images
from .rollout import Trajectory, rescore, rollout

__all__ = [
    "ARTEFACT_STATS",
    "SDE_TYPES",
    "HackingMonitor",
    "MonitorVerdict",
    "OnlineLossOutput",
    "RemoteScorer",
    "RewardServer",
    "RewardServerError",
    "RewardSpec",
    "RewardTerm",
    "Rewards",
    "StepOutput",
    "Trajectory",
    "artefact_record",
    "artefact_stats",
    "background_emptiness",
    "ddim_step_with_logprob",
    "draw_noise",
    "flow_cps_step",
    "flow_grpo_kl",
    "flow_sde_step",
    "gaussian_log_prob",
    "grid_energy",
    "group_advantages",
    "grpo_loss",
    "high_frequency_energy",
    "nft_loss",
    "nft_optimality",
    "rescore",
    "rollout",
    "saturation",
    "sde_window",
    "to_pil_images",
    "train_step_indices",
]


def __getattr__(name: str):
    # lazy: ``python -m diffalign.online.reward_server`` must not find the module imported by this package first
    if name in ("RemoteScorer", "RewardServer", "RewardServerError"):
        from . import reward_server

        return getattr(reward_server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
