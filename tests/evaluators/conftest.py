"""Shared tiny scorer directories (built once per session: the CLIP tokenizer alone takes seconds) and cases."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _evaluator_cases as _cases

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """``{scorer name: directory}`` with tiny random weights in the official formats, for every registry name."""
    from fixtures import tiny_scorers as tiny

    root = tmp_path_factory.mktemp("tiny_scorers")
    clip_dir = tiny.save_tiny_clip(root / "clip")
    aesthetic_dir = root / "aesthetic"
    shutil.copytree(clip_dir, aesthetic_dir)
    from diffalign.evaluators.aesthetic import HEAD_FILENAME, AestheticMLP

    torch.save(tiny.randomize_(AestheticMLP(16), 1).state_dict(), aesthetic_dir / HEAD_FILENAME)
    return {
        "pickscore": clip_dir,
        "clip": clip_dir,
        "aesthetic": aesthetic_dir,
        "hpsv2": tiny.save_tiny_hps(root / "hpsv2", "v2.0"),
        "hpsv2.1": tiny.save_tiny_hps(root / "hpsv2.1", "v2.1", seed=1),
        "imagereward": tiny.save_tiny_imagereward(root / "imagereward"),
    }


@pytest.fixture(scope="session")
def case_images():
    return _cases.make_images()


@pytest.fixture(scope="session")
def cases(case_images):
    """(images, prompts) aligned lists over ``_evaluator_cases.pairs()`` (RGB; see the RGB deviation in ``_transforms``)."""
    pairs = _cases.pairs()
    return [case_images[n] for n, _ in pairs], [p for _, p in pairs]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # Never wait on the hub from a test.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
