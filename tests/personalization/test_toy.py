"""The toy multi-user world: hue tastes, conflicting labels on the same pairs, a dataset the trainer reads."""

import numpy as np
import pytest
from PIL import Image

from diffalign.personalization.toy import (
    HELDOUT_USERS,
    TRAIN_USERS,
    ImagePairs,
    ToyUser,
    label_pairs,
    layout_features,
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


def test_user_rewards():
    images = [square(2, 2, 20), square(24, 10, 6), square(13, 13, 6)]  # big, small off-centre, small centred
    users = {u.name: u for u in TRAIN_USERS}
    r = {n: u.reward(images) for n, u in users.items()}
    assert r["big"].argmax() == 0 and r["small"].argmin() == 0
    assert r["centred"].argmax() == 2 and r["off-centre"].argmax() == 1
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
