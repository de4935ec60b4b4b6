"""Preference data: datasets, joint transforms, the latent/text cache."""

from .cache import EmbeddingCache, cache_key
from .images import PairTransform, UnreadableImage, decode_image
from .pairs import (
    DatasetFormatError,
    PreferencePairs,
    ResumableSampler,
    collate_pairs,
    pickapic_winner,
)

__all__ = [
    "DatasetFormatError",
    "EmbeddingCache",
    "PairTransform",
    "PreferencePairs",
    "ResumableSampler",
    "UnreadableImage",
    "cache_key",
    "collate_pairs",
    "decode_image",
    "pickapic_winner",
]
