"""The one interface every scorer implements, and the error raised when weights are missing.

A scorer maps ``(images, prompts)`` to one float per image::

    scorer = diffalign.evaluators.load("pickscore")
    scores = scorer.score([img_a, img_b], ["a cat", "a cat"])   # float32 tensor, shape (2,), on CPU

Scorers batch internally (``batch_size``), run their networks on ``device`` in ``dtype`` (``None``/"fp32",
"fp16", "bf16"), and always return float32 scores on CPU so that results from different devices aggregate alike.
Embeddings are L2-normalised and combined in float32 even when the network runs in half precision.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from PIL import Image

from ._errors import WeightsNotFoundError  # noqa: F401  (re-exported)

_DTYPES = {
    None: torch.float32,
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """``None``/"fp32" -> float32, "fp16" -> float16, "bf16" -> bfloat16; a ``torch.dtype`` passes through."""
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be float32, float16 or bfloat16. Got {dtype}.")
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(k for k in _DTYPES if k)} or None. Got {dtype!r}.")
    return _DTYPES[dtype]


def check_inputs(images: Sequence[Image.Image], prompts: Sequence[str] | str) -> list[str]:
    """Validate ``images``/``prompts`` and return the prompts as a list aligned with ``images``.

    A single string is broadcast to every image (the usual "rank K candidates for one prompt" call).
    """
    if isinstance(images, Image.Image):
        raise TypeError("images must be a list of PIL images, not a single image; wrap it in a list.")
    if isinstance(prompts, str):
        prompts = [prompts] * len(images)
    prompts = list(prompts)
    if len(prompts) != len(images):
        raise ValueError(f"Got {len(images)} images for {len(prompts)} prompts; pass one prompt per image.")
    for i, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise TypeError(f"images[{i}] is a {type(image).__name__}; scorers take PIL images.")
    return prompts


def batches(n: int, batch_size: int) -> Iterator[slice]:
    """Slices ``[0:b], [b:2b], ...`` covering ``range(n)``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1. Got {batch_size}.")
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


class Scorer:
    """Base class: subclasses implement :meth:`_score_batch` on one batch of already-validated inputs.

    Attributes:
        name: registry name (``"pickscore"``, ``"hpsv2"``, ...).
        weights: where the weights came from (hub id, directory or file), for reports.
        higher_is_better: every bundled metric is "higher is better"; win rates use it.
    """

    name: str = "scorer"
    higher_is_better: bool = True

    def __init__(self, *, device: str | torch.device = "cpu", dtype=None, batch_size: int = 16, weights=None):
        self.device = torch.device(device)
        self.dtype = parse_dtype(dtype)
        self.batch_size = int(batch_size)
        self.weights = None if weights is None else str(weights)

    def score(
        self, images: Sequence[Image.Image], prompts: Sequence[str] | str, *, batch_size: int | None = None
    ):
        """Score each image against its prompt.

        Args:
            images: N PIL images (any mode; converted to RGB first).
            prompts: N prompts, or one prompt for all images.
            batch_size: images per forward pass (default: the scorer's ``batch_size``).

        Returns:
            float32 tensor of shape (N,) on CPU.
        """
        return self._batched(self._score_batch, images, prompts, batch_size)

    def _batched(self, fn, images, prompts, batch_size: int | None) -> torch.Tensor:
        """Run ``fn(images_batch, prompts_batch) -> (B,)`` over batches; float32 (N,) on CPU."""
        prompts = check_inputs(images, prompts)
        out = [torch.zeros(0)]
        with torch.inference_mode():
            for sl in batches(len(images), batch_size or self.batch_size):
                out.append(fn(list(images[sl]), prompts[sl]).float().cpu())
        return torch.cat(out)

    __call__ = score

    def _score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, weights={self.weights!r}, device={str(self.device)!r}, dtype={self.dtype})"


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """``x / ||x||_2`` along the last dim, in float32; a zero vector stays zero (the aesthetic reference replaces
    zero norms by 1)."""
    x = x.float()
    norm = x.norm(p=2, dim=-1, keepdim=True)
    return x / torch.where(norm == 0, torch.ones_like(norm), norm)
