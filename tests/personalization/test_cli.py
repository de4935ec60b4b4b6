"""``diffalign personalize``: few-shot users from an examples file, training users by id, interpolation."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.personalization import (
    PreferenceExample,
    UserBranchSpec,
    UserEncoderConfig,
    attach_user_branch,
    save_examples,
    save_user_branch,
    user_processors,
)
from diffalign.personalization.cli import _cfg_tokens, main, parse_mix
from diffalign.personalization.io import save_user_embeddings

GEN = ["--steps", "2", "--guidance", "3", "--seed", "7"]


@pytest.fixture(scope="module")
def run_dir(tiny_sd15_dir, tmp_path_factory):
    """A PPD output_dir made by hand: a random (non-zero) branch for the tiny model, pixel encoder, two users."""
    from diffalign.models import load_components

    out = tmp_path_factory.mktemp("ppd-run")
    unet = load_components(tiny_sd15_dir).unet
    spec = UserBranchSpec((1, 12), 4, 32, encoder=UserEncoderConfig(type="pixels", grid=2))
    attach_user_branch(unet, spec)
    g = torch.Generator().manual_seed(0)
    for proc in user_processors(unet).values():
        proc.to_v_u.weight.data = torch.randn(proc.to_v_u.weight.shape, generator=g)
    save_user_branch(unet, out, spec)
    save_user_embeddings({"alice": torch.randn((2, 1, 12), generator=g), "bob": torch.randn((1, 1, 12), generator=g)},
                         out, {"note": "test"})
    examples = [PreferenceExample("a red circle", Image.new("RGB", (32, 32), (220, 40, 40)),
                                  Image.new("RGB", (32, 32), (40, 70, 220)))] * 2
    save_examples(examples, out / "warm.jsonl")
    return out


def pngs(folder):
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


def test_parse_mix():
    assert parse_mix("a:0.3,b:0.7") == [("a", 0.3), ("b", 0.7)]
    assert parse_mix("dir/c:d.jsonl:1") == [("dir/c:d.jsonl", 1.0)]
    assert parse_mix("solo") == [("solo", 1.0)]
    with pytest.raises(ValueError, match="bad weight"):
        parse_mix("a:x")


def test_cfg_tokens_cond_only():
    u = torch.ones(1, 4, 32)
    assert _cfg_tokens(u, cond_only=False, guided=True, batch=2) is u  # broadcast to both CFG halves
    t = _cfg_tokens(u, cond_only=True, guided=True, batch=2)
    assert t.shape == (4, 4, 32) and t[:2].abs().sum() == 0 and torch.equal(t[2:], u.expand(2, -1, -1))


def test_personalize_cli(tiny_sd15_dir, run_dir, tmp_path):
    from diffalign.generate import main as generate_main

    common = ["--model", tiny_sd15_dir, "--lora", str(run_dir), "--prompt", "a red circle", *GEN]
    assert generate_main(["--model", tiny_sd15_dir, "--prompt", "a red circle", "--out", str(tmp_path / "g"), *GEN]) == 0
    assert main([*common, "--out", str(tmp_path / "none")]) == 0
    base = pngs(tmp_path / "g")
    assert all(np.array_equal(a, b) for a, b in zip(base.values(), pngs(tmp_path / "none").values()))  # no user

    # as a user types it: `diffalign generate ... --user-examples FILE` is served by the personalize command
    from diffalign.cli import main as diffalign

    few_args = [*common, "--user-examples", str(run_dir / "warm.jsonl")]
    assert diffalign(["generate", *few_args, "--out", str(tmp_path / "few")]) == 0
    assert diffalign(["personalize", *few_args, "--out", str(tmp_path / "few2")]) == 0
    few = pngs(tmp_path / "few")
    assert np.array_equal(few["0000_00.png"], pngs(tmp_path / "few2")["0000_00.png"])
    assert list(few) == ["0000_00.png"] and not np.array_equal(few["0000_00.png"], base["0000_00.png"])

    # weight 1 on one user: embedding and prediction mixing are the same model
    assert main([*common, "--user-mix", "alice:1", "--out", str(tmp_path / "e")]) == 0
    assert main([*common, "--user-mix", "alice:1", "--mix-space", "prediction", "--out", str(tmp_path / "p")]) == 0
    assert np.array_equal(pngs(tmp_path / "e")["0000_00.png"], pngs(tmp_path / "p")["0000_00.png"])

    mix = f"alice:0.5,{run_dir / 'warm.jsonl'}:0.5"
    assert main([*common, "--user-mix", mix, "--mix-space", "prediction", "--user-cond-only",
                 "--out", str(tmp_path / "m")]) == 0
    meta = json.loads((tmp_path / "m" / "users.json").read_text())
    assert [u["weight"] for u in meta["users"]] == [0.5, 0.5] and meta["mix_space"] == "prediction"

    assert main([*common, "--user-mix", "nobody:1", "--out", str(tmp_path / "x")]) == 2
