"""The toy multi-user world: lightness/warmth tastes on whitened axes, conflicting labels on the same pairs, a dataset
the trainer reads."""

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
    image_features,
    taste_axes,
    toy_base_model,
    training_users,
    user_examples,
    write_pairs,
)

BLUE, RED, YELLOW = (40, 70, 220), (220, 40, 40), (240, 210, 40)


def rect(x0, y0, w, h, fg=RED, bg=BLUE):
    """A ``w`` x ``h`` px rectangle with its top-left corner at column x0, row y0 on a 32x32 background."""
    a = np.zeros((32, 32, 3), np.uint8)
    a[:] = bg
    a[y0:y0 + h, x0:x0 + w] = fg
    return Image.fromarray(a)


def square(x0, y0, side, fg=RED, bg=BLUE):
    return rect(x0, y0, side, side, fg, bg)


def lightness(rgb):
    return sum(rgb) / 3 / 255


def warmth(rgb):
    return (rgb[0] - rgb[2]) / 255


def test_image_features_by_hand():
    images = [square(4, 10, 8), rect(12, 2, 16, 8, fg=YELLOW, bg=RED), Image.new("RGB", (32, 32), BLUE)]
    f = image_features(images)  # (lightness, warmth) of the whole image: pixel-count weighted means
    np.testing.assert_allclose(f[0], [(64 * lightness(RED) + 960 * lightness(BLUE)) / 1024,
                                      (64 * warmth(RED) + 960 * warmth(BLUE)) / 1024])
    np.testing.assert_allclose(f[1], [(128 * lightness(YELLOW) + 896 * lightness(RED)) / 1024,
                                      (128 * warmth(YELLOW) + 896 * warmth(RED)) / 1024])
    np.testing.assert_allclose(f[2], [lightness(BLUE), warmth(BLUE)])
    np.testing.assert_allclose(image_features([square(20, 2, 8)])[0], f[0])  # wherever the object is


def test_taste_axes_by_hand():
    images = [square(4, 10, 8), rect(12, 2, 16, 8, fg=YELLOW, bg=RED)]
    (l0, w0), (l1, w1) = image_features(images)
    s_l, k, s_w = TASTE_WHITENING
    np.testing.assert_allclose(taste_axes(images), [[l0 / s_l, (w0 - k * l0) / s_w], [l1 / s_l, (w1 - k * l1) / s_w]])


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
    """assets/toy-sd-ppd: `python -m diffalign.toy pretrain ... --shade-jitter 0.3 --background-jitter 0.3
    --cast-jitter 0.2 --unet-down-block-types CrossAttnDownBlock2D CrossAttnDownBlock2D` (module doc): the report's
    config is that command's, the U-Net has cross-attention at 8x8."""
    import argparse
    import json

    from diffalign.toy import pretrain

    blocks = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    args = argparse.Namespace(seed=0, vae_steps=None, unet_steps=None, n_images=None, aspect_jitter=None,
                              shade_jitter=0.3, background_jitter=0.3, cast_jitter=0.2,
                              unet_down_block_types=blocks)
    assert pretrain.load_report(TOY_MODEL_DIR)["config"] == pretrain.config_from_args(args).to_dict()
    unet = json.loads((TOY_MODEL_DIR / "unet" / "config.json").read_text())
    assert unet["down_block_types"] == blocks and unet["up_block_types"] == ["CrossAttnUpBlock2D"] * 2
    assert toy_base_model() == str(TOY_MODEL_DIR)


def test_user_rewards():
    # light vs. dark red square; the same shades elsewhere, bigger; a warm and a cold cast of one image
    light, dark = (250, 120, 120), (120, 20, 20)
    warm_bg, cold_bg = (80, 90, 200), (20, 90, 250)  # about equally light, R - B far apart
    images = [square(4, 10, 12, fg=light), square(4, 10, 12, fg=dark), square(6, 6, 12, bg=warm_bg),
              square(6, 6, 12, bg=cold_bg), square(18, 18, 12, fg=light)]
    users = {u.name: u for u in TRAIN_USERS}
    r = {n: u.reward(images) for n, u in users.items()}
    z = taste_axes(images)
    assert z[0, 0] > z[1, 0] and r["light"][0] > r["light"][1] and r["dark"][1] > r["dark"][0]
    assert r["warm"][2] > r["warm"][3] and r["cold"][3] > r["cold"][2]
    np.testing.assert_allclose(r["light"][0], r["light"][4])  # not where the object is
    np.testing.assert_allclose(r["light"], z[:, 0])  # the users are the axes
    np.testing.assert_allclose(r["warm"], z[:, 1])
    np.testing.assert_allclose(r["light"], -r["dark"])  # opposite users, opposite rewards
    np.testing.assert_allclose(r["warm"], -r["cold"])
    np.testing.assert_allclose(ToyUser("x", 45).reward(images), (r["light"] + r["warm"]) / 2 ** 0.5)
    assert {u.name for u in HELDOUT_USERS}.isdisjoint(users)
    held = {u.name: u.angle for u in HELDOUT_USERS}
    assert held == {"light-warm": 45.0, "dark-warm": 135.0, "dark-cold": 225.0, "light-cold": 315.0}


def test_training_users_around_the_circle():
    assert training_users() == TRAIN_USERS
    users = training_users(30)
    assert [u.angle for u in users] == [30.0 * k for k in range(12)]
    assert set(TRAIN_USERS) <= set(users) and users[1] == ToyUser("taste-030", 30.0)
    assert len({u.name for u in users}) == 12
    with pytest.raises(ValueError, match="held-out"):
        training_users(45)  # would train on the held-out light-warm, ...
    with pytest.raises(ValueError, match="divide 90"):
        training_users(40)  # would skip the named users


def test_opposite_users_label_the_same_pairs_oppositely(tmp_path):
    from diffalign.data import PreferencePairs

    pale, red = square(4, 4, 20, fg=(250, 120, 120)), square(4, 4, 8)  # a light red square, a red one
    pairs = ImagePairs(["a red square on a blue background"] * 3, [pale, red, pale], [red, pale, pale],
                       [0, 2, 4], [1, 3, 5])
    cols = label_pairs(pairs, TRAIN_USERS)
    rows = {name: [i for i, u in enumerate(cols["user_id"]) if u == name] for name in ("light", "dark")}
    assert len(rows["light"]) == len(rows["dark"]) == 2  # the identical pair is a tie for everyone and is left out
    assert [cols["label_0"][i] for i in rows["light"]] == [1.0, 0.0]
    assert [cols["label_0"][i] for i in rows["dark"]] == [0.0, 1.0]
    ds = PreferencePairs(write_pairs(cols, tmp_path / "pairs").parent, split="train")
    assert len(ds) == len(cols["user_id"]) and list(ds.ds["user_id"]) == cols["user_id"]
    ex = user_examples(pairs, TRAIN_USERS[0], n=2)
    assert ex[0].chosen is pale and ex[1].chosen is pale
    (second,) = user_examples(pairs, TRAIN_USERS[0], n=1, draw=1)  # the next decisive pair, not the first again
    assert second.chosen is pale and second.rejected is ex[1].rejected
    with pytest.raises(ValueError, match="decisive"):
        user_examples(pairs, TRAIN_USERS[0], n=3)


def test_pair_parts_are_disjoint_equal_slices_in_order():
    imgs = [square(0, 0, k + 1) for k in range(7)]
    pairs = ImagePairs([f"c{k}" for k in range(7)], imgs, imgs[::-1], list(range(0, 14, 2)), list(range(1, 14, 2)))
    parts = [pairs.part(i, 3) for i in range(3)]
    assert [p.captions for p in parts] == [["c0", "c1"], ["c2", "c3"], ["c4", "c5"]]  # c6: the remainder, left out
    assert parts[1].images_0 == imgs[2:4] and parts[1].images_1 == imgs[::-1][2:4]
    assert parts[2].seeds_0 == [8, 10] and parts[2].seeds_1 == [9, 11]
    with pytest.raises(ValueError, match="part 3 of 3"):
        pairs.part(3, 3)


@pytest.mark.slow
def test_toy_table_script_runs_quick(tmp_path):
    """The table script end to end at a tiny scale, on the shipped toy base."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "scripts" / "ppd_toy_table.py"
    out = subprocess.run([sys.executable, str(script), "--quick", "--out", str(tmp_path / "t")],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "t" / "table.md").exists() and (tmp_path / "t" / "results.json").exists()
