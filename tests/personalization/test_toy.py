"""The toy multi-user world: hue tastes, conflicting labels on the same pairs, a dataset the trainer reads."""

import numpy as np
import pytest
from PIL import Image

from diffalign.personalization.toy import (
    HELDOUT_USERS,
    TRAIN_USERS,
    ImagePairs,
    ToyUser,
    hue_features,
    label_pairs,
    user_examples,
    write_pairs,
)

RED, BLUE, GREEN = (220, 40, 40), (40, 70, 220), (40, 170, 60)


def solid(c):
    return Image.new("RGB", (32, 32), c)


def test_hue_features_and_user_rewards():
    f = hue_features([solid(RED), solid(GREEN)])
    assert f[0] == pytest.approx([(220 - 40) / 255, (40 - (220 + 40) / 2) / 255])
    assert f[1] == pytest.approx([(40 - 60) / 255, (170 - (40 + 60) / 2) / 255])
    users = {u.name: u for u in TRAIN_USERS}
    r = {n: u.reward([solid(RED), solid(BLUE), solid(GREEN)]) for n, u in users.items()}
    assert r["warm"].argmax() == 0 and r["cold"].argmax() == 1 and r["green"].argmax() == 2
    np.testing.assert_allclose(r["warm"], -r["cold"])  # opposite users, opposite rewards
    np.testing.assert_allclose(ToyUser("x", 45).reward([solid(RED)]), (r["warm"][:1] + r["green"][:1]) / 2 ** 0.5)
    assert {u.name for u in HELDOUT_USERS}.isdisjoint(users)


def test_opposite_users_label_the_same_pairs_oppositely(tmp_path):
    from diffalign.data import PreferencePairs

    pairs = ImagePairs(["a red circle on a blue background"] * 3, [solid(RED), solid(BLUE), solid(GREEN)],
                       [solid(BLUE), solid(RED), solid(GREEN)], [0, 2, 4], [1, 3, 5])
    cols = label_pairs(pairs, TRAIN_USERS)
    warm = [i for i, u in enumerate(cols["user_id"]) if u == "warm"]
    cold = [i for i, u in enumerate(cols["user_id"]) if u == "cold"]
    assert len(warm) == len(cold) == 2  # the identical pair is a tie for everyone and is left out
    assert [cols["label_0"][i] for i in warm] == [1.0, 0.0] and [cols["label_0"][i] for i in cold] == [0.0, 1.0]
    ds = PreferencePairs(write_pairs(cols, tmp_path / "pairs").parent, split="train")
    assert len(ds) == len(cols["user_id"]) and list(ds.ds["user_id"]) == cols["user_id"]
    ex = user_examples(pairs, TRAIN_USERS[0], n=2)
    assert ex[0].chosen.getpixel((0, 0)) == RED and ex[1].chosen.getpixel((0, 0)) == RED
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
