"""On-disk cache of VAE latent distributions and text embeddings, reused across epochs and runs.

Keyed by everything that changes the cached values: model source/revision/VAE, resolution, crop and the family.
A pair's entry is stored per (dataset index, flip), holding the VAE posterior ``mean`` and ``std`` of winner and
loser (with ``random_flip`` the trainer may store both flips on a pair's first visit: ``dataset.cache_flips``); the
trainer draws ``z = mean + std · ξ`` from its own generator, exactly what ``latent_dist.sample()`` does without a
cache, so cached and uncached runs see the same distribution. Text entries are keyed by the prompt's
SHA-1. Every file is written to a temporary name and renamed, so a crash never leaves a torn entry.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def cache_key(**fields) -> str:
    """A short stable hash of the fields (model id, revision, VAE, resolution, crop, ...)."""
    return hashlib.sha1(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


class EmbeddingCache:
    def __init__(self, root: str | os.PathLike, key: str, meta: dict | None = None):
        self.dir = Path(root) / key
        self.dir.mkdir(parents=True, exist_ok=True)
        if meta is not None and not (self.dir / "meta.json").exists():
            (self.dir / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
        self.hits = 0
        self.misses = 0

    def _latent_path(self, index: int, flip: bool) -> Path:
        return self.dir / "latents" / f"{index // 1000:05d}" / f"{index}_{int(flip)}.safetensors"

    def _text_path(self, prompt: str) -> Path:
        digest = hashlib.sha1(prompt.encode("utf-8", errors="surrogatepass")).hexdigest()
        return self.dir / "text" / digest[:2] / f"{digest}.safetensors"

    def get_latents(self, index: int, flip: bool) -> dict[str, torch.Tensor] | None:
        """``{"mean": (2, C, h, w), "std": (2, C, h, w)}`` for [winner, loser], or ``None``."""
        path = self._latent_path(index, flip)
        if not path.exists():
            self.misses += 1
            return None
        self.hits += 1
        return load_file(str(path))

    def put_latents(self, index: int, flip: bool, mean: torch.Tensor, std: torch.Tensor, **extra) -> None:
        """Store [winner, loser] posterior stats (2, C, h, w) plus extra tensors (e.g. SDXL sizes)."""
        _atomic_save({"mean": mean, "std": std, **extra}, self._latent_path(index, flip))

    def has_text(self, prompt: str) -> bool:
        return self._text_path(prompt).exists()

    def get_text(self, prompt: str) -> dict[str, torch.Tensor] | None:
        path = self._text_path(prompt)
        return load_file(str(path)) if path.exists() else None

    def put_text(self, prompt: str, features: dict[str, torch.Tensor]) -> None:
        _atomic_save(features, self._text_path(prompt))
