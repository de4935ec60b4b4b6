import pytest


def write_user_pairs(path, n=16, users=("alice", "bob", "carol"), seed=0):
    """A Pick-a-Pic-schema parquet with a ``user_id`` column: user k prefers the redder image if k is even,
    the bluer one otherwise (conflicting tastes on random solid-colour images)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fixtures.data import png_bytes

    rng = np.random.default_rng(seed)
    rows = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": [], "label_1": [], "user_id": []}
    for i in range(n):
        c0, c1 = rng.integers(0, 255, 3), rng.integers(0, 255, 3)
        k = i % len(users)
        warm0 = int(c0[0]) - int(c0[2]) > int(c1[0]) - int(c1[2])
        first = warm0 if k % 2 == 0 else not warm0
        rows["caption"].append(f"a prompt number {i}")
        rows["jpg_0"].append(png_bytes(c0))
        rows["jpg_1"].append(png_bytes(c1))
        rows["label_0"].append(1.0 if first else 0.0)
        rows["label_1"].append(0.0 if first else 1.0)
        rows["user_id"].append(users[k])
    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows), path / "train.parquet")
    return path


@pytest.fixture(scope="session")
def user_pairs_dir(tmp_path_factory):
    return write_user_pairs(tmp_path_factory.mktemp("data") / "users")


def _ppd_config(model_dir, data_dir, out_dir, objective=None, **overrides):
    from fixtures.data import base_config
    from diffalign.training.config import parse_config

    obj = {"name": "ppd", "encoder": {"type": "clip", "model": "tiny"}, "num_examples": 2, **(objective or {})}
    return parse_config(base_config(model_dir, data_dir, out_dir, objective=obj, **overrides))


@pytest.fixture
def ppd_config():
    """``ppd_config(model_dir, data_dir, out_dir, objective={...}, **overrides)`` -> a parsed PPD TrainConfig
    (tiny CLIP user encoder, 2 examples per user)."""
    return _ppd_config
