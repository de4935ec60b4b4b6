"""PPD: personalized preference fine-tuning (Dang et al., CVPR 2025) — user embeddings from few-shot examples,
injected by decoupled cross-attention, trained with user-conditioned Diffusion-DPO.

Importing this package registers the ``ppd`` objective (the training config does, so ``objective: ppd`` parses).
The training recipe (:class:`diffalign.personalization.trainer.PersonalizedTrainer`) and the command line
(:mod:`.cli`) are imported on use, so importing this package loads no training module.
"""

from .attention import (
    DecoupledUserAttnProcessor,
    UserTokensIgnored,
    cross_attention_layers,
    install_user_branch,
    remove_user_branch,
    user_attention,
    user_processors,
)
from .io import (
    USER_BRANCH_NAME,
    USER_EMBEDDINGS_NAME,
    UserBranchSpec,
    attach_user_branch,
    detach_user_branch,
    load_user_branch,
    load_user_embeddings,
    save_user_branch,
    user_tokens,
)
from .objective import PPDConfig, build_ppd, ppd_loss, ppd_losses
from .user_encoder import (
    ClipUserEncoder,
    PixelUserEncoder,
    PreferenceExample,
    UserEncoder,
    UserEncoderConfig,
    UserProjection,
    VLMUserEncoder,
    build_user_encoder,
    load_examples,
    save_examples,
)

__all__ = [
    "USER_BRANCH_NAME",
    "USER_EMBEDDINGS_NAME",
    "ClipUserEncoder",
    "DecoupledUserAttnProcessor",
    "PPDConfig",
    "PixelUserEncoder",
    "PreferenceExample",
    "UserBranchSpec",
    "UserEncoder",
    "UserEncoderConfig",
    "UserProjection",
    "UserTokensIgnored",
    "VLMUserEncoder",
    "attach_user_branch",
    "build_ppd",
    "build_user_encoder",
    "cross_attention_layers",
    "detach_user_branch",
    "install_user_branch",
    "load_examples",
    "load_user_branch",
    "load_user_embeddings",
    "ppd_loss",
    "ppd_losses",
    "remove_user_branch",
    "save_examples",
    "save_user_branch",
    "user_attention",
    "user_processors",
    "user_tokens",
]
