"""InPO / DDIM-InPO (Lu et al., CVPR 2025, arXiv 2503.18454): Diffusion-DPO on latents picked by DDIM inversion.

The loss is Diffusion-DPO's (official convention, the 1/2 inside); what changes is where :math:`x_t` and the target
come from. Per pair, t ~ U{0..999} is shared by winner and loser; each clean latent is inverted (no grad, by the
**policy**, η = 0.1, 10-step grid; :mod:`diffalign.inversion`) to :math:`\\tilde x`, and the target is the implied
noise :math:`\\tilde ε = (\\tilde x - \\sqrt{\\bar α_t} x_0)/\\sqrt{1-\\bar α_t}`, so that
:math:`x_t = \\sqrt{\\bar α_t} x_0 + \\sqrt{1-\\bar α_t}\\tilde ε = \\tilde x`. Winner and loser share t but not noise.
Policy and reference are evaluated on the same :math:`(\\tilde x, t)`. The inversion runs the model, so it lives
in the training layer (:class:`diffalign.training.inpo.InversionTrainer`); this module holds the loss and its config.

Cost per training step: :math:`\\max_i n(t_i)` extra no-grad U-Net calls on the 2B batch (inversion), with
:math:`n(t) = \\#\\{k ∈ \\{-99, 1, 101, …, 801\\} : k < t\\}` ∈ [1, 10], mean 6.382 for one pair per batch; then the usual
one policy call and one reference call.

``timesteps: official`` (default, parity with ``JaydenLyh/InPO`` ``train.py`` at a9cfc4d) calls the U-Net and
back-solves at the sampled t although the inverted latent sits at level L(t) ∈ [t, t+99] (or 901 < t for
t > 901); ``timesteps: inverted_level`` uses L(t) instead (reconstructed alternative, not the official code).
β default 5000 = the official script default (SD1.5 launcher 2000, SDXL launcher 5000).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .base import register_objective
from .dpo import DPOConfig, build_dpo


@dataclass
class InPOConfig(DPOConfig):
    inversion_steps: int = field(default=10, metadata={"help": "DDIM inversion grid size (official 10)."})
    eta: float = field(default=0.1, metadata={"help": "η noise added per inversion step (official 0.1)."})
    timesteps: str = field(default="official", metadata={"help": "official | inverted_level (see docstring)."})

    def __post_init__(self):
        super().__post_init__()
        if self.inversion_steps < 1:
            raise ValueError(f"inversion_steps: must be >= 1, got {self.inversion_steps}")
        if self.eta < 0:
            raise ValueError(f"eta: must be >= 0, got {self.eta}")
        if self.timesteps not in ("official", "inverted_level"):
            raise ValueError(f"timesteps: must be official or inverted_level, got {self.timesteps!r}")


@register_objective("inpo", InPOConfig, needs_reference=True)
def build_inpo(config: InPOConfig):
    """InPO (Lu et al., 2025): Diffusion-DPO on DDIM-inverted latents."""
    return build_dpo(config)
