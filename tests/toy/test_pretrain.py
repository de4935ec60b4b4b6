"""The pretraining script: deterministic given the seed, and (slow, opt-in) reproduces the shipped quality."""

import os

import pytest
import torch

from diffalign import toy
from diffalign.toy import pretrain

TINY = dict(n_images=48, vae_steps=2, vae_batch_size=8, unet_steps=2, unet_batch_size=8, warmup_steps=1)


def _weights(report):
    pipe = report["pipeline"]
    return {
        f"{name}.{k}": v
        for name in ("vae", "unet", "text_encoder")
        for k, v in getattr(pipe, name).state_dict().items()
    }


def test_short_pretraining_is_deterministic():
    a = _weights(pretrain.pretrain(pretrain.PretrainConfig(seed=0, **TINY), None, progress=False, run_eval=False))
    b = _weights(pretrain.pretrain(pretrain.PretrainConfig(seed=0, **TINY), None, progress=False, run_eval=False))
    c = _weights(pretrain.pretrain(pretrain.PretrainConfig(seed=1, **TINY), None, progress=False, run_eval=False))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_config_validation():
    with pytest.raises(ValueError, match="caption_dropout"):
        pretrain.PretrainConfig(caption_dropout=1.5)
    cfg = pretrain.PretrainConfig()
    assert pretrain.PretrainConfig(**{**cfg.to_dict(), "model": cfg.model.to_dict()}).to_dict() == cfg.to_dict()


def test_cli_unet_blocks_flag_adds_cross_attention_at_8x8():
    import argparse

    from diffalign.toy.components import build_components

    base = {"seed": 0, "vae_steps": None, "unet_steps": None, "n_images": None, "aspect_jitter": None,
            "shade_jitter": None, "background_jitter": None, "cast_jitter": None}
    default = pretrain.config_from_args(argparse.Namespace(**base, unet_down_block_types=None))
    assert default.to_dict() == pretrain.PretrainConfig().to_dict()
    blocks = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    cfg = pretrain.config_from_args(argparse.Namespace(**base, unet_down_block_types=blocks))
    unet = build_components(cfg.model, seed=0)["unet"]
    assert list(unet.config.down_block_types) == blocks
    assert list(unet.config.up_block_types) == ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
    # cross-attention now at the 8x8 level too: attn2 modules in the first down block and the last up block
    assert any(n.endswith("attn2") for n, _ in unet.down_blocks[0].named_modules())
    assert any(n.endswith("attn2") for n, _ in unet.up_blocks[-1].named_modules())
    jitter = pretrain.config_from_args(argparse.Namespace(**{**base, "aspect_jitter": 0.5}, unet_down_block_types=None))
    assert jitter.aspect_jitter == 0.5 and pretrain.PretrainConfig().aspect_jitter == 0.0
    default_unet = build_components(default.model, seed=0)["unet"]
    assert not any(n.endswith("attn2") for n, _ in default_unet.down_blocks[0].named_modules())


# Stated in assets/README.md: a rerun of the default pretraining lands within these bounds of the shipped report.
REPRO_BOUNDS = {"vae_recon_mse": 0.002, "train.match": 0.10, "heldout.match": 0.15, "train.reward": 0.10}


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("DIFFALIGN_SLOW"), reason="full pretraining (~35 min); set DIFFALIGN_SLOW=1")
def test_pretraining_reproduces_shipped_quality(tmp_path):
    torch.set_num_threads(1)  # as the documented command; on this machine the re-run is then bit-identical
    shipped = pretrain.load_report(toy.toy_model_path())["quality"]
    report = pretrain.pretrain(pretrain.PretrainConfig(), tmp_path / "toy-sd", progress=False)
    for key, bound in REPRO_BOUNDS.items():
        parts = key.split(".")
        got, want = report["quality"], shipped
        for p in parts:
            got, want = got[p], want[p]
        assert abs(got - want) <= bound, (key, got, want)
