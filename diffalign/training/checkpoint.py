"""Atomic training checkpoints: ``output_dir/checkpoints/checkpoint-<step>/``.

A checkpoint is written into ``checkpoint-<step>.partial/`` and renamed into place only after every file and its
``manifest.json`` (SHA-256 of each file) is on disk, so a crash mid-write leaves a ``.partial`` folder that is never
picked up. Weights are safetensors; optimizer/scheduler/RNG state is loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError:
        pass


def save_checkpoint(root: Path, step: int, weights: dict[str, torch.Tensor], state: dict, keep_last: int | None):
    """Write weights (safetensors) + training state (torch) atomically; prune to the last ``keep_last``."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"checkpoint-{step}"
    tmp = root / f"checkpoint-{step}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / "weights.safetensors"))
    torch.save(state, tmp / "state.pt")
    files = {name: _sha256(tmp / name) for name in ("weights.safetensors", "state.pt")}
    with open(tmp / "manifest.json", "w") as f:
        json.dump({"step": step, "files": files}, f)
        f.flush()
        os.fsync(f.fileno())
    for name in files:
        with open(tmp / name, "rb") as f:
            os.fsync(f.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    prune_checkpoints(root, keep_last)
    return final


def prune_checkpoints(root: Path, keep_last: int | None, keep: tuple[Path, ...] = ()) -> None:
    """Delete all but the newest ``keep_last`` checkpoints (``None``: keep all), never one in ``keep``. Called after
    each save, and on resume: a run killed between writing a checkpoint and pruning would otherwise keep one too many
    for good."""
    if keep_last is None:
        return
    for old in list_checkpoints(root)[:-keep_last]:
        if old not in keep:
            shutil.rmtree(old, ignore_errors=True)


def is_complete(path: Path) -> bool:
    manifest = path / "manifest.json"
    if not manifest.is_file():
        return False
    try:
        files = json.loads(manifest.read_text())["files"]
        return all((path / n).is_file() and _sha256(path / n) == digest for n, digest in files.items())
    except (ValueError, KeyError, OSError):
        return False


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (``.partial`` folders are ignored)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def checkpoint_step(path: Path) -> int:
    """The step a ``checkpoint-N`` folder was written at."""
    return int(CHECKPOINT_RE.match(path.name).group(1))


def latest_checkpoint(root: Path) -> Path | None:
    """The newest checkpoint whose manifest checksums verify."""
    for path in reversed(list_checkpoints(root)):
        if is_complete(path):
            return path
    return None


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    return load_file(str(path / "weights.safetensors")), torch.load(path / "state.pt", weights_only=True)
