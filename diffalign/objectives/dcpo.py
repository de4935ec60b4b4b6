"""DCPO, Dual Caption Preference Optimization (Saeidi, Luo et al., arXiv 2502.06023, TMLR 2025).

The Diffusion-DPO loss with the winner conditioned on its caption :math:`z_w` and the loser on its own :math:`z_l`:

.. math::

    L = -\\log σ\\Big(-\\tfrac{β}{2}\\big[(e_θ(x_w|z_w) - e_θ(x_l|z_l)) - (e_{ref}(x_w|z_w) - e_{ref}(x_l|z_l))\\big]\\Big)

Both captions go through **one** U-Net call (the 2B batch is ``[x_w|z_w; x_l|z_l]``); the reference sees the same
dual captions. β default 500 as in the official launcher ``src/run.sh`` (script default 5000), official code
``sahsaeedi/DCPO-T2I`` ``src/dcpo_trainer.py`` at 62335bb. Where z_l comes from (``loser_caption``):
``column`` (``caption_chosen``/``caption_rejected`` or per-image ``caption_0``/``caption_1`` columns),
``perturb`` (z_w = c, z_l = perturbed c, DCPO-p), ``caption`` (an image-to-text model, DCPO-c) or ``hybrid``
(z_l = perturbed caption of x_l, DCPO-h); see :mod:`diffalign.data.captions`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .base import register_objective
from .dpo import DPOConfig, build_dpo

LOSER_CAPTION_SOURCES = ("column", "perturb", "caption", "hybrid")


@dataclass
class DCPOConfig(DPOConfig):
    beta: float = field(default=500.0, metadata={"help": "β (official launcher 500; script default 5000)."})
    loser_caption: str = field(default="perturb", metadata={"help": "column | perturb | caption | hybrid."})
    perturbation: str = field(default="medium", metadata={"help": "weak | medium | strong (DIPPER 40/60/80)."})
    captioner: str | None = field(default=None, metadata={"help": "image-to-text model id for caption/hybrid."})

    def __post_init__(self):
        super().__post_init__()
        if self.loser_caption not in LOSER_CAPTION_SOURCES:
            raise ValueError(f"loser_caption: must be one of {', '.join(LOSER_CAPTION_SOURCES)}, "
                             f"got {self.loser_caption!r}")
        if self.perturbation not in ("weak", "medium", "strong"):
            raise ValueError(f"perturbation: must be weak, medium or strong, got {self.perturbation!r}")
        if self.loser_caption == "caption" and not self.captioner:
            raise ValueError("captioner: loser_caption 'caption' needs an image-to-text model id")


@register_objective("dcpo", DCPOConfig, needs_reference=True, dual_captions=True)
def build_dcpo(config: DCPOConfig):
    """DCPO (Saeidi et al., 2025): Diffusion-DPO on p(x_w|z_w) vs p(x_l|z_l)."""
    return build_dpo(config)
