"""The shipped toy pipeline (assets/toy-sd): loads with diffusers, matches the script's config, draws its captions."""

import json

import numpy as np
import pytest
import torch

from diffalign import toy
from diffalign.toy import components, pretrain

MODEL = toy.toy_model_path()
pytestmark = pytest.mark.skipif(not (MODEL / "model_index.json").exists(), reason=f"{MODEL} not built")

# Stated in assets/README.md: at least this share of generations for the prompts below match their captions.
MIN_MATCH_RATE = 0.6


@pytest.fixture(scope="module")
def pipe():
    return toy.load_toy_pipeline()


def test_loads_as_a_stable_diffusion_pipeline(pipe):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    assert isinstance(pipe, StableDiffusionPipeline) and isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.vae_scale_factor * pipe.unet.config.sample_size == toy.IMAGE_SIZE
    assert pipe.tokenizer.model_max_length == pipe.text_encoder.config.max_position_embeddings
    assert pipe.tokenizer("a red circle on a blue background").input_ids[0] == 49406
    size = sum(f.stat().st_size for f in MODEL.rglob("*") if f.is_file())
    assert size < 15_000_000


def test_shipped_config_is_the_script_config():
    """``python -m diffalign.toy pretrain`` with defaults builds exactly the shipped architecture."""
    cfg = components.ToyModelConfig()
    unet = json.loads((MODEL / "unet" / "config.json").read_text())
    for key, value in components.unet_kwargs(cfg).items():
        assert unet[key] == (list(value) if isinstance(value, tuple) else value), key
    vae = json.loads((MODEL / "vae" / "config.json").read_text())
    for key, value in components.vae_kwargs(cfg).items():
        if key != "scaling_factor":
            assert vae[key] == (list(value) if isinstance(value, tuple) else value), key
    report = pretrain.load_report(MODEL)
    assert report["config"] == pretrain.PretrainConfig().to_dict()
    assert vae["scaling_factor"] == pytest.approx(report["scaling_factor"])


def test_generations_match_captions(pipe):
    prompts = toy.heldout_prompts()[:6] + toy.train_prompts()[::13]
    images = toy.generate(pipe, prompts * 2, seeds=list(range(2 * len(prompts))))
    assert all(im.size == (32, 32) for im in images)
    match = toy.caption_match(images, prompts * 2)
    assert match.mean() >= MIN_MATCH_RATE


def test_generate_is_seeded_per_image(pipe):
    prompts = toy.heldout_prompts()[:3]
    a = toy.generate(pipe, prompts, seeds=[5, 6, 7])
    b = toy.generate(pipe, prompts[1:], seeds=[6, 7], batch_size=1)
    # equal up to uint8 rounding (batched and unbatched convolutions round differently)
    np.testing.assert_allclose(np.asarray(a[1], dtype=float), np.asarray(b[0], dtype=float), atol=1)
    np.testing.assert_allclose(np.asarray(a[2], dtype=float), np.asarray(b[1], dtype=float), atol=1)
    with pytest.raises(ValueError, match="prompts for"):
        toy.generate(pipe, prompts, seeds=[1])


def test_asset_paths_follow_the_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv(toy.ASSETS_ENV, str(tmp_path))
    assert toy.toy_model_path() == tmp_path / "toy-sd" and toy.toy_pairs_path() == tmp_path / "toy-pairs"
