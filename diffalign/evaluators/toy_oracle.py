"""The toy world's oracle reward as an evaluator metric (``load("toy")``, ``diffalign eval --metric toy``).

``score(images, prompts)`` is :func:`diffalign.toy.oracle_reward`: caption fidelity (background, shape colour and
shape class, each in [0, 1], averaged) plus ``taste_weight`` times the taste for bigger shapes; range
[0, 1 + taste_weight], higher is better. It needs no weights and runs offline on a CPU.

It is only meaningful on the toy world's images (32x32, one coloured shape on a plain background, see
:mod:`diffalign.toy.shapes`) and their captions (``"a red circle on a blue background"``); any other prompt is
rejected with a ``ValueError``. Images are scored exactly as given: the oracle's size terms are in pixels of a
32x32 image.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from .base import Scorer, check_inputs


def check_prompts(prompts: Sequence[str]) -> None:
    """``ValueError`` naming the first prompt that is not a toy caption (``"a red circle on a blue background"``)."""
    from diffalign.toy.shapes import parse_caption

    for i, p in enumerate(prompts):
        try:
            parse_caption(p)
        except ValueError as exc:
            raise ValueError(f"prompt {i}: {exc}") from None


class ToyOracle(Scorer):
    name = "toy"

    def __init__(self, *, taste_weight: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.taste_weight = float(taste_weight)

    @classmethod
    def from_pretrained(
        cls,
        weights: str | None = None,
        *,
        device="cpu",
        dtype=None,
        batch_size: int = 16,
        taste_weight: float = 1.0,
    ) -> ToyOracle:
        """The oracle has no weights: ``weights`` must be ``None``. ``device``/``dtype`` are accepted for the common
        interface and ignored (the oracle is numpy on CPU)."""
        if weights:
            raise ValueError(
                f"toy: the toy oracle is computed from the pixels and takes no weights (got {weights!r}); "
                "use --metric toy / load('toy')"
            )
        return cls(taste_weight=taste_weight, device="cpu", dtype=dtype, batch_size=batch_size)

    def score(
        self, images: Sequence[Image.Image], prompts: Sequence[str] | str, *, batch_size: int | None = None
    ) -> torch.Tensor:
        """:func:`diffalign.toy.oracle_reward` per image, float32 (N,) on CPU. Every prompt must be a toy caption
        (checked before any image is scored, so a bad prompt fails at once with one line)."""
        prompts = check_inputs(images, prompts)
        try:
            check_prompts(prompts)
        except ValueError as exc:
            raise ValueError(f"toy: {exc}") from None
        return super().score(images, prompts, batch_size=batch_size)

    __call__ = score

    def _score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        from diffalign.toy.oracle import oracle_reward

        # one image at a time: oracle_reward stacks its batch, and a folder may hold images of different sizes
        rewards = [
            oracle_reward([im], [p], taste_weight=self.taste_weight)[0] for im, p in zip(images, prompts)
        ]
        return torch.tensor(rewards, dtype=torch.float64).float()
