"""DCPO, Dual Caption Preference Optimization (Saeidi, Luo et al., arXiv 2502.06023, TMLR 2025).

The Diffusion-DPO loss with the winner conditioned on its caption :math:`z_w` and the loser on its
own :math:`z_l`:

.. math::

    L = -\\log σ\\Big(-\\tfrac{β}{2}\\big[(e_θ(x_w|z_w) - e_θ(x_l|z_l))
        - (e_{ref}(x_w|z_w) - e_{ref}(x_l|z_l))\\big]\\Big)

Both captions go through **one** U-Net call (the 2B batch is ``[x_w|z_w; x_l|z_l]``); the reference sees the
same dual captions. β default 500 as in the official launcher ``src/run.sh`` (script default 5000), official
code ``sahsaeedi/DCPO-T2I`` ``src/dcpo_trainer.py`` at 62335bb. Where z_l comes from (``loser_caption``):

* ``column`` (default, the official code): captions stored in the data,
  ``caption_chosen``/``caption_rejected``, per-image ``caption_0``/``caption_1`` (DualCPO/pick-double-caption,
  the official training data) or the (winner, loser) columns named by ``caption_columns``. DCPO-p and DCPO-h
  are this mode with DIPPER paraphrases precomputed into a column (of the prompt for DCPO-p, of the loser's
  caption for DCPO-h).
* ``word_swap``: z_w = c, z_l = c with ``swap_fraction`` of its content words replaced; an offline stand-in
  for closed-vocabulary worlds, **not** DIPPER paraphrasing.
* ``caption``: an image-to-text model writes z_w and z_l. ``hybrid``: z_l = word_swap(stored caption of x_l).

See :mod:`diffalign.data.captions`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .base import register_objective
from .dpo import DPOConfig, build_dpo

LOSER_CAPTION_SOURCES = ("column", "word_swap", "caption", "hybrid")


@dataclass
class DCPOConfig(DPOConfig):
    beta: float = field(default=500.0, metadata={"help": "β (official launcher 500; script default 5000)."})
    loser_caption: str = field(default="column", metadata={
        "help": "column (stored captions, the official code; precomputed DIPPER paraphrases give DCPO-p/h) | "
                "word_swap (replace content words of the prompt; not DIPPER) | "
                "caption (image-to-text model) | hybrid (word_swap of the loser's stored caption)."})
    caption_columns: list[str] | None = field(default=None, metadata={
        "help": "[z_w column, z_l column] in winner/loser order, e.g. [caption, prompt_paraphrase] (DCPO-p); "
                "null = caption_chosen/caption_rejected or caption_0/caption_1."})
    swap_fraction: float = field(default=0.6, metadata={
        "help": "word_swap/hybrid: fraction of content words replaced (at least one word)."})
    captioner: str | None = field(default=None, metadata={"help": "image-to-text model id for caption mode."})

    def __post_init__(self):
        super().__post_init__()
        if self.loser_caption == "perturb":
            raise ValueError("loser_caption: 'perturb' is now 'word_swap' (it replaces words; it is not "
                             "DIPPER paraphrasing); for DCPO-p use 'column' with precomputed paraphrases")
        if self.loser_caption not in LOSER_CAPTION_SOURCES:
            raise ValueError(f"loser_caption: must be one of {', '.join(LOSER_CAPTION_SOURCES)}, "
                             f"got {self.loser_caption!r}")
        if not 0 < self.swap_fraction <= 1:
            raise ValueError(f"swap_fraction: must be in (0, 1], got {self.swap_fraction}")
        if self.caption_columns is not None:
            if len(self.caption_columns) != 2 or not all(isinstance(c, str) for c in self.caption_columns):
                raise ValueError(f"caption_columns: must be two column names [z_w, z_l], "
                                 f"got {self.caption_columns}")
            if self.loser_caption not in ("column", "hybrid"):
                raise ValueError(f"caption_columns: only read by loser_caption column or hybrid, "
                                 f"not {self.loser_caption!r}")
            self.caption_columns = list(self.caption_columns)
        if self.loser_caption == "caption" and not self.captioner:
            raise ValueError("captioner: loser_caption 'caption' needs an image-to-text model id")


@register_objective("dcpo", DCPOConfig, needs_reference=True, dual_captions=True)
def build_dcpo(config: DCPOConfig):
    """DCPO (Saeidi et al., 2025): Diffusion-DPO on p(x_w|z_w) vs p(x_l|z_l)."""
    return build_dpo(config)
