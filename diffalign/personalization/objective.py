"""PPD: user-conditioned Diffusion-DPO (Dang, Singh, Zhou, Ermon, Song, "Personalized Preference Fine-tuning
of Diffusion Models", CVPR 2025, https://arxiv.org/abs/2501.06655). No official code; reconstructed from the
paper's description (see ``docs/ppd.md`` for every choice left open).

.. math::

    L_{PPD}(θ) = -\\mathbb{E}_{(c, x^w, x^l, u)}\\, \\log σ\\Big(-\\tfrac{β}{2}\\big[(e_θ^w(u) - e_{ref}^w)
                 - (e_θ^l(u) - e_{ref}^l)\\big]\\Big)

with :math:`e_θ^w(u) = \\mathrm{mean}\\lVert ε - ε_θ(x_t^w, c, u, t)\\rVert^2` the policy's error *given the
user embedding u of the user who labelled the pair*, and :math:`e_{ref}` the error of the base model without
any user branch. It is Diffusion-DPO (:mod:`diffalign.objectives.dpo`, same ½ and mean-over-latent convention)
where the policy is conditioned on u; "multi-reward" in the paper's words: every user is a different reward.

=============  ===========================================================================
argument       paper symbol
=============  ===========================================================================
``model_w``    :math:`\\lVert ε^w - ε_θ(x_t^w, c, u, t)\\rVert^2` (mean over latent dims)
``ref_w``      :math:`\\lVert ε^w - ε_{ref}(x_t^w, c, t)\\rVert^2` (no user branch)
``beta``       β (not published for PPD; default 5000, the Diffusion-DPO launchers' value)
=============  ===========================================================================

The user conditioning lives in the errors, not in this function: the recipe
(:class:`diffalign.personalization.trainer.PersonalizedTrainer`) encodes each pair's user, drops the embedding
with probability ``user_dropout`` (zeroed tokens = the branch off) and runs the reference without the branch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..objectives.base import ObjectiveOutput, PairErrors, register_objective
from ..objectives.dpo import dpo_logits, dpo_metrics
from .attention import INITS
from .user_encoder import UserEncoderConfig


def ppd_loss(model_w, model_l, ref_w, ref_l, beta: float = 5000.0) -> torch.Tensor:
    """PPD loss, mean over the batch, as a 0-d tensor. All inputs (B,); ``model_*`` computed with each pair's
    user.

    ``loss = mean(-logsigmoid(-0.5 * beta * ((model_w - ref_w) - (model_l - ref_l))))``
    """
    return ppd_losses(model_w, model_l, ref_w, ref_l, beta=beta).mean()


def ppd_losses(model_w, model_l, ref_w, ref_l, *, beta: float = 5000.0) -> torch.Tensor:
    """Per-pair PPD losses, shape (B,)."""
    shape = model_w.shape
    if len(shape) != 1 or any(t.shape != shape for t in (model_l, ref_w, ref_l)):
        raise ValueError(f"expected four error tensors of one shape (B,), got "
                         f"{[tuple(t.shape) for t in (model_w, model_l, ref_w, ref_l)]}")
    return -F.logsigmoid(dpo_logits(model_w, model_l, ref_w, ref_l, beta))


@dataclass
class PPDConfig:
    # Loss.
    beta: float = field(default=5000.0, metadata={
        "help": "β of the user-conditioned Diffusion-DPO loss, official DPO convention (½ inside). PPD's "
                "value is not published; 5000 is the Diffusion-DPO launchers' value."})
    # Users and their few-shot examples.
    user_column: str = field(default="user_id", metadata={
        "help": "Dataset column naming the user who labelled each pair (Pick-a-Pic v2: user_id)."})
    num_examples: int = field(default=4, metadata={
        "help": "N: preference examples per user fed to the user encoder (paper: 4). Users with fewer pairs "
                "use all they have."})
    example_sets: int = field(default=1, metadata={
        "help": "K: few-shot sets drawn per training user (each encoded once, one picked at random per "
                "pair). 1 = one fixed embedding per user (the paper's setting, as far as described); "
                "> 1 augments."})
    user_dropout: float | None = field(default=None, metadata={
        "help": "P(user embedding zeroed) per pair during training (paper: 'randomly dropped', rate not "
                "published). null: 0.1 when a LoRA trains (it then learns the population's taste, which "
                "'no user' serves), 0 when only the branch trains: a dropped pair then has policy = "
                "reference, loss ln 2 and zero gradient, so dropout there would only dilute the batch (and "
                "is refused)."})
    # User branch (decoupled cross-attention).
    num_tokens: int = field(default=4, metadata={"help": "N_u: user tokens (IP-Adapter uses 4)."})
    token_dim: int | None = field(default=None, metadata={
        "help": "D_u: user token width; default = the U-Net's cross_attention_dim."})
    scale: float = field(default=1.0, metadata={"help": "s: weight of the user branch (paper's formula: 1)."})
    init: str = field(default="zero_v", metadata={
        "help": "zero_v: W'_v = 0 | zero_gate: a tanh gate at 0. Either way the branch is a no-op "
                "at step 0."})
    # Encoder.
    encoder: UserEncoderConfig = field(default_factory=UserEncoderConfig, metadata={
        "help": "The frozen user encoder: type clip (default) | vlm (paper) | pixels (toy)."})

    def __post_init__(self):
        if isinstance(self.encoder, dict):
            self.encoder = UserEncoderConfig(**self.encoder)
        if not self.beta > 0:
            raise ValueError(f"beta: must be > 0, got {self.beta}")
        if self.num_examples < 1:
            raise ValueError(f"num_examples: must be >= 1, got {self.num_examples}")
        if self.example_sets < 1:
            raise ValueError(f"example_sets: must be >= 1, got {self.example_sets}")
        if self.user_dropout is not None and not 0 <= self.user_dropout < 1:
            raise ValueError(f"user_dropout: must be in [0, 1), got {self.user_dropout}")
        if self.num_tokens < 1:
            raise ValueError(f"num_tokens: must be >= 1, got {self.num_tokens}")
        if self.token_dim is not None and self.token_dim < 1:
            raise ValueError(f"token_dim: must be >= 1 or null, got {self.token_dim}")
        if self.init not in INITS:
            raise ValueError(f"init: must be one of {INITS}, got {self.init!r}")


@register_objective("ppd", PPDConfig, needs_reference=True)
def build_ppd(config: PPDConfig):
    """PPD (Dang et al., 2025): Diffusion-DPO conditioned on the labelling user's embedding."""

    def objective(errors: PairErrors) -> ObjectiveOutput:
        losses = ppd_losses(errors.model_w, errors.model_l, errors.ref_w, errors.ref_l, beta=config.beta)
        logits = dpo_logits(errors.model_w, errors.model_l, errors.ref_w, errors.ref_l, config.beta)
        return ObjectiveOutput(losses.mean(), losses, dpo_metrics(logits, errors))

    return objective
