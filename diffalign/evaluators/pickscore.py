"""PickScore (Kirstain et al., "Pick-a-Pic: An Open Dataset of User Preferences for Text-to-Image Generation",
NeurIPS 2023, https://arxiv.org/abs/2305.01569).

.. math::

    s(x, y) = e^{τ} \\, \\langle \\hat t(x), \\hat v(y) \\rangle, \\qquad
    \\hat p_i = \\frac{\\exp s(x, y_i)}{\\sum_j \\exp s(x, y_j)}

with :math:`\\hat t, \\hat v` the L2-normalised CLIP text and image embeddings and :math:`τ` the checkpoint's
``logit_scale`` (read from the weights, not hard-coded). :math:`\\hat p` is the paper's preference probability,
a softmax over the candidate images for one prompt; for a pair it is ``sigmoid(s_a - s_b)``.

Official path: yuvalkirstain/PickScore ``README.md`` "Inference with PickScore" @f79607f -- model
``yuvalkirstain/PickScore_v1`` (transformers ``CLIPModel``, ViT-H/14), processor
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (shortest side 224 bicubic, centre crop 224, OpenAI mean/std; PIL path as
in transformers 4.27.3), text ``padding=True, truncation=True, max_length=77``.
"""

from __future__ import annotations

import torch
from PIL import Image

from . import _hf_clip
from ._transforms import stack
from .base import Scorer, check_inputs, l2_normalize

DEFAULT_WEIGHTS = "yuvalkirstain/PickScore_v1"
DEFAULT_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def preference_probability(scores_a: torch.Tensor, scores_b: torch.Tensor) -> torch.Tensor:
    """PickScore's pairwise preference probability P(a preferred over b) = softmax([s_a, s_b])[0].

    Args:
        scores_a, scores_b: PickScores (the scaled logits ``s``), shape (N,).

    Returns:
        shape (N,), in (0, 1); ``P(a > b) + P(b > a) == 1``.
    """
    if scores_a.shape != scores_b.shape:
        raise ValueError(
            f"scores_a has shape {tuple(scores_a.shape)} but scores_b has {tuple(scores_b.shape)}."
        )
    logits = torch.stack([scores_a, scores_b], dim=-1).float()  # (N, 2)
    return logits.softmax(dim=-1)[..., 0]


class PickScore(Scorer):
    """``score`` returns the scaled logit ``s`` (papers report its mean, ~20-23 for SD outputs)."""

    name = "pickscore"

    def __init__(self, model, tokenizer, image_config: _hf_clip.ClipImageConfig, **kwargs):
        super().__init__(**kwargs)
        self.model = model
        self.tokenizer = tokenizer
        self.image_config = image_config

    @classmethod
    def from_pretrained(
        cls,
        weights: str | None = None,
        *,
        processor: str | None = None,
        device="cpu",
        dtype=None,
        batch_size: int = 16,
        attn_implementation: str | None = None,
    ) -> PickScore:
        """Load from a hub id or a local directory holding a ``CLIPModel`` and its ``CLIPProcessor``.

        ``processor`` defaults to the laion ViT-H-14 repo when ``weights`` is None (as the official README does),
        else to ``weights`` itself.
        """
        from .base import parse_dtype

        model_dir = _hf_clip.resolve_dir(weights, DEFAULT_WEIGHTS, scorer=cls.name)
        if processor is None:
            processor = DEFAULT_PROCESSOR if weights is None else str(model_dir)
        proc_dir = _hf_clip.resolve_dir(processor, processor, scorer=cls.name)
        model = _hf_clip.load_clip_model(
            model_dir, device=device, dtype=parse_dtype(dtype), attn_implementation=attn_implementation
        )
        return cls(
            model,
            _hf_clip.load_tokenizer(proc_dir),
            _hf_clip.ClipImageConfig.from_pretrained(proc_dir),
            device=device,
            dtype=dtype,
            batch_size=batch_size,
            weights=weights or DEFAULT_WEIGHTS,
        )

    def embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        """Normalised image embeddings, float32 (N, D)."""
        pixels = stack([self.image_config(im) for im in images]).to(self.device, self.dtype)
        return l2_normalize(_hf_clip.features(self.model.get_image_features(pixel_values=pixels)))

    def embed_texts(self, prompts: list[str]) -> torch.Tensor:
        """Normalised text embeddings, float32 (N, D)."""
        tokens = self.tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        out = self.model.get_text_features(
            input_ids=tokens["input_ids"].to(self.device),
            attention_mask=tokens["attention_mask"].to(self.device),
        )
        return l2_normalize(_hf_clip.features(out))

    @property
    def logit_scale(self) -> float:
        """``exp(logit_scale)`` of the checkpoint (~100 for PickScore_v1)."""
        return float(self.model.logit_scale.detach().float().exp())

    def cosine(self, images, prompts, *, batch_size: int | None = None) -> torch.Tensor:
        """The raw cosine ``<t, v>`` (what DiffusionDPO's ``pickscore_utils.Selector.score`` returns), shape (N,)."""
        return self._batched(self._cosine_batch, images, prompts, batch_size)

    def _cosine_batch(self, images, prompts):
        return (self.embed_images(images) * self.embed_texts(prompts)).sum(-1)  # (B, D) . (B, D) -> (B,)

    def _score_batch(self, images, prompts):
        return self.model.logit_scale.detach().float().exp() * self._cosine_batch(images, prompts)

    def probabilities(self, images: list[Image.Image], prompt: str) -> torch.Tensor:
        """Preference probabilities over K candidate images for one prompt: softmax of their scores, shape (K,)."""
        if not isinstance(prompt, str):
            raise TypeError("probabilities() ranks candidates for ONE prompt; pass a string.")
        return self.score(images, prompt).softmax(dim=0)

    def preference(self, images_a, images_b, prompts, *, batch_size: int | None = None) -> torch.Tensor:
        """P(images_a[i] preferred over images_b[i] for prompts[i]), shape (N,)."""
        prompts = check_inputs(images_a, prompts)
        check_inputs(images_b, prompts)
        a = self.score(images_a, prompts, batch_size=batch_size)
        b = self.score(images_b, prompts, batch_size=batch_size)
        return preference_probability(a, b)
