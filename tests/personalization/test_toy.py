"""The toy multi-user world: layout tastes on whitened axes, conflicting labels on the same pairs, a dataset the trainer reads."""

import numpy as np
import pytest
from PIL import Image

from diffalign.personalization.toy import (
    HELDOUT_USERS,
    TASTE_WHITENING,
    TOY_MODEL_DIR,
    TRAIN_USERS,
    ImagePairs,
    ToyUser,
    fit_taste_whitening,
    label_pairs,
    layout_features,
    taste_axes,
    toy_base_model,
    user_examples,
    write_pairs,
)

BLUE, RED, YELLOW = (40, 70, 220), (220, 40, 40), (240, 210, 40)


def square(x0, y0, side, fg=RED, bg=BLUE):
    """A ``side`` px square with its top-left corner at column x0, row y0 on a 32x32 background."""
    a = np.zeros((32, 32, 3), np.uint8)
    a[:] = bg
    a[y0:y0 + side, x0:x0 + side] = fg
    return Image.fromarray(a)


def centred(cx, cy):
    return (0.2 - np.hypot(cx - 16, cy - 16) / 32) / 0.1


def test_layout_features_by_hand():
    # 8x8 square at columns 4..11, rows 10..17: area 64/1024, centroid (8, 14) in pixel-centre coordinates
    f = layout_features([square(4, 10, 8), square(12, 2, 16, fg=YELLOW, bg=RED), Image.new("RGB", (32, 32), BLUE)])
    np.testing.assert_allclose(f[0], [(64 / 1024 - 0.25) / 0.15, centred(8, 14)])
    np.testing.assert_allclose(f[1], [(256 / 1024 - 0.25) / 0.15, centred(20, 10)])  # colours do not matter
    np.testing.assert_allclose(f[2], [-0.25 / 0.15, 0.0])  # nothing on the canvas


def test_taste_axes_by_hand():
    images = [square(4, 10, 8), square(12, 2, 16, fg=YELLOW, bg=RED)]
    (a0, c0), (a1, c1) = layout_features(images)
    s_a, k, s_c = TASTE_WHITENING
    np.testing.assert_allclose(taste_axes(images), [[a0 / s_a, (c0 - k * a0) / s_c], [a1 / s_a, (c1 - k * a1) / s_c]])


def test_fit_taste_whitening_matches_a_cholesky_whitening():
    """(s_a, k, s_c) are the entries of the Cholesky factor L of E[ΔΔᵀ] (L = [[s_a, 0], [k s_a, s_c]]), and the
    whitened pair differences have identity second moments."""
    rng = np.random.default_rng(0)
    f0 = rng.normal(size=(500, 2)) @ np.array([[0.4, 0.3], [0.0, 0.8]])
    f1 = rng.normal(size=(500, 2)) @ np.array([[0.4, 0.3], [0.0, 0.8]])
    s_a, k, s_c = fit_taste_whitening(f0, f1)
    d = f0 - f1
    chol = np.linalg.cholesky(d.T @ d / len(d))
    np.testing.assert_allclose([s_a, k * s_a, s_c], [chol[0, 0], chol[1, 0], chol[1, 1]], rtol=1e-10)
    z = np.stack([d[:, 0] / s_a, (d[:, 1] - k * d[:, 0]) / s_c], 1)
    np.testing.assert_allclose(z.T @ z / len(z), np.eye(2), atol=1e-10)


@pytest.mark.skipif(not (TOY_MODEL_DIR / "model_index.json").is_file(), reason="assets/toy-sd-ppd not shipped")
def test_ppd_base_is_what_the_documented_pretrain_command_makes():
    """assets/toy-sd-ppd: `python -m diffalign.toy pretrain ... --unet-down-block-types CrossAttnDownBlock2D
    CrossAttnDownBlock2D` (module doc): the report's config is that command's, the U-Net has cross-attention at 8x8."""
    import argparse
    import json

    from diffalign.toy import pretrain

    blocks = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    args = argparse.Namespace(seed=0, vae_steps=None, unet_steps=None, n_images=None, unet_down_block_types=blocks)
    assert pretrain.load_report(TOY_MODEL_DIR)["config"] == pretrain.config_from_args(args).to_dict()
    unet = json.loads((TOY_MODEL_DIR / "unet" / "config.json").read_text())
    assert unet["down_block_types"] == blocks and unet["up_block_types"] == ["CrossAttnUpBlock2D"] * 2
    assert toy_base_model()[0] == str(TOY_MODEL_DIR)


def test_user_rewards():
    # same-size squares: centred vs. off-centre; then a big and a small one at the same centre
    images = [square(13, 13, 6), square(24, 10, 6), square(6, 6, 20), square(13, 13, 6, fg=YELLOW)]
    users = {u.name: u for u in TRAIN_USERS}
    r = {n: u.reward(images) for n, u in users.items()}
    assert r["centred"][0] > r["centred"][1] and r["off-centre"][1] > r["off-centre"][0]
    assert r["big"][2] > r["big"][3] and r["small"][3] > r["small"][2]
    assert r["big"][0] == r["big"][1]  # same area: the size axis does not care where the shape is
    np.testing.assert_allclose(r["big"], -r["small"])  # opposite users, opposite rewards
    np.testing.assert_allclose(r["centred"], -r["off-centre"])
    np.testing.assert_allclose(ToyUser("x", 45).reward(images), (r["big"] + r["centred"]) / 2 ** 0.5)
    assert {u.name for u in HELDOUT_USERS}.isdisjoint(users)


def test_opposite_users_label_the_same_pairs_oppositely(tmp_path):
    from diffalign.data import PreferencePairs

    big, small = square(4, 4, 20), square(4, 4, 8)
    pairs = ImagePairs(["a red square on a blue background"] * 3, [big, small, big], [small, big, big],
                       [0, 2, 4], [1, 3, 5])
    cols = label_pairs(pairs, TRAIN_USERS)
    rows = {name: [i for i, u in enumerate(cols["user_id"]) if u == name] for name in ("big", "small")}
    assert len(rows["big"]) == len(rows["small"]) == 2  # the identical pair is a tie for everyone and is left out
    assert [cols["label_0"][i] for i in rows["big"]] == [1.0, 0.0]
    assert [cols["label_0"][i] for i in rows["small"]] == [0.0, 1.0]
    ds = PreferencePairs(write_pairs(cols, tmp_path / "pairs").parent, split="train")
    assert len(ds) == len(cols["user_id"]) and list(ds.ds["user_id"]) == cols["user_id"]
    ex = user_examples(pairs, TRAIN_USERS[0], n=2)
    assert ex[0].chosen is big and ex[1].chosen is big
    (second,) = user_examples(pairs, TRAIN_USERS[0], n=1, draw=1)  # the next decisive pair, not the first again
    assert second.chosen is big and second.rejected is ex[1].rejected
    with pytest.raises(ValueError, match="decisive"):
        user_examples(pairs, TRAIN_USERS[0], n=3)


@pytest.mark.slow
def test_toy_table_script_runs_quick(tmp_path):
    """The table script end to end at a tiny scale (random tiny model if assets/toy-sd is absent)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "scripts" / "ppd_toy_table.py"
    out = subprocess.run([sys.executable, str(script), "--quick", "--out", str(tmp_path / "t")],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "t" / "table.md").exists() and (tmp_path / "t" / "results.json").exists()
