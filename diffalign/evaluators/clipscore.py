"""CLIP score as torchmetrics defines it (Hessel et al., "CLIPScore", EMNLP 2021, https://arxiv.org/abs/2104.08718,
with w = 100 instead of 2.5).

.. math::

    \\mathrm{CLIPScore}(I, C) = \\max(100 \\cos(E_I, E_C), 0)

Official path: Lightning-AI/torchmetrics ``src/torchmetrics/functional/multimodal/clip_score.py`` @dab0333 (1.9.0),
default model ``openai/clip-vit-large-patch14`` (``CLIPModel`` + ``CLIPProcessor``). Two details of that code are
kept on purpose:

* Text is tokenised with ``padding=True`` and *no* truncation; when longer than the model's
  ``max_position_embeddings`` the ids and mask are sliced to the first 77 tokens (the EOS token is dropped; the
  model's pooling rule then decides which position is pooled). :attr:`CLIPScore.truncated` counts such prompts.
* torchmetrics' docstring clamps each sample, ``max(100 cos, 0)``, but its code clamps the *mean*. ``score``
  returns the per-image definition; :meth:`CLIPScore.raw` returns ``100 cos`` unclamped and
  :func:`corpus_clip_score` reproduces the torchmetrics aggregate ``max(mean(100 cos), 0)``. For real image/text
  pairs cosines are positive and the two agree.
"""

from __future__ import annotations

import torch
from PIL import Image

from . import _hf_clip
from ._transforms import stack
from .base import Scorer, l2_normalize, parse_dtype

DEFAULT_WEIGHTS = "openai/clip-vit-large-patch14"


def corpus_clip_score(raw_scores: torch.Tensor) -> torch.Tensor:
    """torchmetrics' ``clip_score`` over a set: ``max(mean(100 cos), 0)`` from :meth:`CLIPScore.raw` values."""
    return raw_scores.float().mean().clamp(min=0)


class CLIPScore(Scorer):
    name = "clip"

    def __init__(self, model, tokenizer, image_config: _hf_clip.ClipImageConfig, **kwargs):
        super().__init__(**kwargs)
        self.model = model
        self.tokenizer = tokenizer
        self.image_config = image_config
        self.truncated = 0  # prompts longer than the text tower's context seen so far

    @classmethod
    def from_pretrained(
        cls,
        weights: str | None = None,
        *,
        device="cpu",
        dtype=None,
        batch_size: int = 16,
        attn_implementation=None,
    ) -> CLIPScore:
        """Load from a hub id or a local directory holding a ``CLIPModel`` and its ``CLIPProcessor``."""
        directory = _hf_clip.resolve_dir(weights, DEFAULT_WEIGHTS, scorer=cls.name)
        model = _hf_clip.load_clip_model(
            directory, device=device, dtype=parse_dtype(dtype), attn_implementation=attn_implementation
        )
        return cls(
            model,
            _hf_clip.load_tokenizer(directory),
            _hf_clip.ClipImageConfig.from_pretrained(directory),
            device=device,
            dtype=dtype,
            batch_size=batch_size,
            weights=weights or DEFAULT_WEIGHTS,
        )

    def _cosine_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        pixels = stack([self.image_config(im) for im in images]).to(self.device, self.dtype)
        img = l2_normalize(_hf_clip.features(self.model.get_image_features(pixel_values=pixels)))
        tokens = self.tokenizer(prompts, padding=True, return_tensors="pt")
        ids, mask = tokens["input_ids"], tokens["attention_mask"]
        max_len = self.model.config.text_config.max_position_embeddings
        if ids.shape[-1] > max_len:  # torchmetrics: slice, do not re-insert EOS
            self.truncated += int((mask.sum(-1) > max_len).sum())
            ids, mask = ids[:, :max_len], mask[:, :max_len]
        txt = self.model.get_text_features(input_ids=ids.to(self.device), attention_mask=mask.to(self.device))
        return (img * l2_normalize(_hf_clip.features(txt))).sum(-1)  # (B,)

    def raw(self, images, prompts, *, batch_size: int | None = None) -> torch.Tensor:
        """``100 cos`` without the clamp, shape (N,)."""
        return 100 * self._batched(self._cosine_batch, images, prompts, batch_size)

    def _score_batch(self, images, prompts):
        return (100 * self._cosine_batch(images, prompts)).clamp(min=0)
