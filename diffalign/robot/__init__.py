"""Robot-policy preference heads: DeformPAM (Diffusion-DPO on an action policy + reward-guided action selection) and
RAPL (preference-aligned visual encoder + optimal-transport reward), with the Detour2D CPU toy task.

The heads reuse the package's likelihood layer (:mod:`diffalign.likelihood`) and DPO objective
(:mod:`diffalign.objectives`): a :class:`DiffusionActionPolicy` is a denoiser ``f(x_t, t, obs)`` like any U-Net.
See ``docs/robot.md``.
"""

# Import order note: the first import below pulls in .objectives, which imports diffalign.objectives before anything
# here imports diffalign.likelihood (importing diffalign.likelihood first currently trips a circular import in
# diffalign.objectives; see docs/robot.md).
from .configuration_deformpam import DeformPAMConfig
from .configuration_diffusion_policy import DiffusionPolicyConfig
from .configuration_rapl import RAPLConfig
from .data import PreferencePairs, ranking_to_comparisons, simulated_annotator
from .modeling_deformpam import (
    DeformPAMHead,
    RewardGuidedSelector,
    Selection,
    expected_max_of_n,
    implicit_reward,
    select_by_reward,
)
from .modeling_diffusion_policy import (
    ConditionalUnet1D,
    DiffusionActionPolicy,
    MLPDenoiser,
    MLPEncoder,
    PointNetEncoder,
)
from .modeling_rapl import RAPLHead, RAPLReward, SmallCNN, TorchvisionEncoder
from .objectives import (
    deformpam_logits,
    deformpam_loss,
    pair_dpo_losses,
    preference_losses_with_ties,
    rapl_triplet_loss,
    triplet_probability,
)
from .ot import cosine_cost, euclidean_cost, ot_reward, ot_step_rewards, sinkhorn

__all__ = [
    "ConditionalUnet1D",
    "DeformPAMConfig",
    "DeformPAMHead",
    "DiffusionActionPolicy",
    "DiffusionPolicyConfig",
    "MLPDenoiser",
    "MLPEncoder",
    "PointNetEncoder",
    "PreferencePairs",
    "RAPLConfig",
    "RAPLHead",
    "RAPLReward",
    "RewardGuidedSelector",
    "Selection",
    "SmallCNN",
    "TorchvisionEncoder",
    "cosine_cost",
    "deformpam_logits",
    "deformpam_loss",
    "euclidean_cost",
    "expected_max_of_n",
    "implicit_reward",
    "ot_reward",
    "ot_step_rewards",
    "pair_dpo_losses",
    "preference_losses_with_ties",
    "ranking_to_comparisons",
    "rapl_triplet_loss",
    "select_by_reward",
    "simulated_annotator",
    "sinkhorn",
    "triplet_probability",
]
