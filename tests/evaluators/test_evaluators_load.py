"""``load``: names, lazy import, the offline error, batching, dtype."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import diffalign.evaluators as ev
from diffalign.evaluators import WeightsNotFoundError, load

EXPECTED_IDS = {
    "pickscore": "yuvalkirstain/PickScore_v1",
    "clip": "openai/clip-vit-large-patch14",
    "hpsv2": "xswu/HPSv2/HPS_v2_compressed.pt",
    "hpsv2.1": "xswu/HPSv2/HPS_v2.1_compressed.pt",
    "imagereward": "THUDM/ImageReward/ImageReward.pt",
    "aesthetic": "sac+logos+ava1-l14-linearMSE.pth",
}


def test_names():
    assert ev.available() == ["pickscore", "hpsv2", "hpsv2.1", "imagereward", "clip", "aesthetic", "toy", "brightness"]
    with pytest.raises(ValueError, match="unknown scorer 'hps'"):
        load("hps")


def test_import_is_lazy():
    code = "import sys, diffalign.evaluators as e; e.available(); assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", list(EXPECTED_IDS))
def test_offline_without_weights_fails_with_one_line(name, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("DIFFALIGN_CACHE", str(tmp_path / "cache"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(WeightsNotFoundError) as info:
        load(name)
    message = str(info.value)
    assert isinstance(info.value, RuntimeError)
    assert "\n" not in message
    assert EXPECTED_IDS[name] in message
    assert f"--metric {name}=" in message  # where to put the files / how to pass them
    if name == "aesthetic":
        assert str(tmp_path / "cache" / "aesthetic") in message


def test_unreachable_hub_fails_fast_without_offline_flag(monkeypatch, tmp_path):
    from diffalign.evaluators import _weights

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(_weights, "_reachable", lambda url, timeout=3.0: False)
    with pytest.raises(WeightsNotFoundError, match="no-such-org/no-such-model"):
        load("clip", weights="no-such-org/no-such-model")


@pytest.mark.parametrize("name", list(EXPECTED_IDS))
def test_batching_shape_and_dtype(name, tiny_dirs, cases):
    images, prompts = cases
    scorer = load(name, weights=str(tiny_dirs[name]), batch_size=6)
    full = scorer.score(images, prompts)
    assert full.shape == (len(images),) and full.dtype == torch.float32 and full.device.type == "cpu"
    torch.testing.assert_close(scorer.score(images, prompts, batch_size=1), full, atol=1e-5, rtol=0)
    assert torch.isfinite(full).all()
    with pytest.raises(ValueError, match="6 images for 5 prompts"):
        scorer.score(images, prompts[:5])


@pytest.mark.parametrize("name", ["pickscore", "hpsv2", "imagereward"])
def test_bf16_runs_close_to_fp32(name, tiny_dirs, cases):
    images, prompts = cases
    fp32 = load(name, weights=str(tiny_dirs[name])).score(images, prompts)
    bf16 = load(name, weights=str(tiny_dirs[name]), dtype="bf16")
    assert next(p for p in (bf16.model).parameters()).dtype == torch.bfloat16
    got = bf16.score(images, prompts)
    assert got.dtype == torch.float32
    # bf16 keeps ~3 significant digits; the tiny random nets amplify it a little.
    assert (got - fp32).abs().max() < 0.1 * (fp32.abs().max() + 1e-3)


def test_bad_dtype():
    from diffalign.evaluators.base import parse_dtype

    assert parse_dtype("fp16") == torch.float16 and parse_dtype(None) == torch.float32
    with pytest.raises(ValueError, match="int8"):
        parse_dtype("int8")
