"""Image-preference evaluators behind one interface: PickScore, HPSv2/v2.1, ImageReward, CLIP score, aesthetic, and
the toy world's oracle reward (``toy``: no weights, offline, only meaningful on toy-world images), and mean
``brightness`` (no weights; a deliberately hackable reward for the reward-hacking monitor's demonstrations).

    >>> from diffalign.evaluators import load
    >>> scorer = load("pickscore", device="cuda", dtype="fp16")     # doctest: +SKIP
    >>> scorer.score(images, prompts)                                # float32 tensor (N,)  # doctest: +SKIP

``load(name, weights=None, device="cpu", dtype=None, batch_size=16, **options)``: ``weights`` is a hub id, a local
directory or a local file; ``None`` uses the official id. Offline and without a local copy, ``load`` raises
:class:`WeightsNotFoundError` with one line naming the id and where to put the files. Importing this package is
cheap: torch models, transformers and open_clip are imported by ``load``.
"""

from __future__ import annotations

import importlib

from ._errors import WeightsNotFoundError

# name -> (module, class, fixed options)
_REGISTRY: dict[str, tuple[str, str, dict]] = {
    "pickscore": ("pickscore", "PickScore", {}),
    "hpsv2": ("hps", "HPSv2", {"version": "v2.0"}),
    "hpsv2.1": ("hps", "HPSv2", {"version": "v2.1"}),
    "imagereward": ("imagereward", "ImageReward", {}),
    "clip": ("clipscore", "CLIPScore", {}),
    "aesthetic": ("aesthetic", "AestheticScore", {}),
    "toy": ("toy_oracle", "ToyOracle", {}),
    "brightness": ("brightness", "Brightness", {}),
}

# Names computed without weights (``weights`` must be None).
WEIGHT_FREE = ("toy", "brightness")

# Official weights per name (what weights=None resolves to).
DEFAULT_WEIGHTS = {
    "pickscore": "yuvalkirstain/PickScore_v1 (processor: laion/CLIP-ViT-H-14-laion2B-s32B-b79K)",
    "hpsv2": "xswu/HPSv2/HPS_v2_compressed.pt",
    "hpsv2.1": "xswu/HPSv2/HPS_v2.1_compressed.pt",
    "imagereward": "THUDM/ImageReward/ImageReward.pt (tokenizer: bert-base-uncased)",
    "clip": "openai/clip-vit-large-patch14",
    "aesthetic": "sac+logos+ava1-l14-linearMSE.pth (GitHub) on openai/clip-vit-large-patch14",
    "toy": "none (diffalign.toy.oracle_reward, computed from the pixels)",
    "brightness": "none (mean Rec. 601 luma of the pixels; a deliberately hackable reward)",
}


def available() -> list[str]:
    """The scorer names ``load`` accepts."""
    return list(_REGISTRY)


def load(
    name: str, weights: str | None = None, device: str = "cpu", dtype=None, batch_size: int = 16, **options
):
    """Build scorer ``name`` (one of :func:`available`).

    Args:
        name: "pickscore", "hpsv2", "hpsv2.1", "imagereward", "clip", "aesthetic", "toy" (the toy world's
            oracle reward, :mod:`~diffalign.evaluators.toy_oracle`; no weights) or "brightness" (mean luma).
        weights: hub id, local directory or local file; ``None`` = the official weights (:data:`DEFAULT_WEIGHTS`).
        device: where the networks run ("cpu", "cuda", "cuda:1", ...).
        dtype: ``None``/"fp32", "fp16" or "bf16" for the networks; scores are always returned as float32 on CPU.
        batch_size: images per forward pass.
        options: scorer-specific keywords (``processor=`` for pickscore, ``clip=`` for aesthetic,
            ``antialias=`` for hpsv2, ``attn_implementation=`` for the CLIP-based scorers, ``taste_weight=`` for toy).

    Returns:
        a :class:`~diffalign.evaluators.base.Scorer`.

    Raises:
        WeightsNotFoundError: offline and no local copy.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown scorer {name!r}; available: {', '.join(_REGISTRY)}.")
    module, cls_name, fixed = _REGISTRY[name]
    cls = getattr(importlib.import_module(f"{__name__}.{module}"), cls_name)
    return cls.from_pretrained(weights, device=device, dtype=dtype, batch_size=batch_size, **fixed, **options)


def preference_probability(scores_a, scores_b):
    """PickScore's pairwise preference probability P(a > b) = softmax([s_a, s_b])[0], shape (N,)."""
    from .pickscore import preference_probability as _pp

    return _pp(scores_a, scores_b)


def __getattr__(name: str):
    if name == "Scorer":  # lazy: base imports torch
        from .base import Scorer

        return Scorer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_WEIGHTS",
    "WEIGHT_FREE",
    "Scorer",
    "WeightsNotFoundError",
    "available",
    "load",
    "preference_probability",
]
