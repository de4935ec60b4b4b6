"""Mean brightness, a deliberately hackable reward (``load("brightness")``): it rewards washing an image out, not
following its prompt. The online runs of ``docs/online.md`` optimise it to show the reward-hacking monitor flag a
run whose reward rises while held-out metrics fall.

``score(images, prompts)`` = the mean over pixels of the Rec. 601 luma ``Y = 0.299 R + 0.587 G + 0.114 B`` with R,
G, B in [0, 1]; range [0, 1], higher is brighter. Prompts are accepted and ignored; no weights.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .base import Scorer

LUMA = (0.299, 0.587, 0.114)


class Brightness(Scorer):
    name = "brightness"

    @classmethod
    def from_pretrained(cls, weights: str | None = None, *, device="cpu", dtype=None, batch_size: int = 16):
        """No weights (``weights`` must be None); ``device``/``dtype`` are ignored (numpy on CPU)."""
        if weights:
            raise ValueError(f"brightness: computed from the pixels, takes no weights (got {weights!r})")
        return cls(device="cpu", dtype=dtype, batch_size=batch_size)

    def _score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        luma = np.asarray(LUMA, dtype=np.float64)
        values = [float((np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0 @ luma).mean()) for im in images]
        return torch.tensor(values, dtype=torch.float32)
