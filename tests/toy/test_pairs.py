"""The shipped pair set (assets/toy-pairs): Pick-a-Pic v2 schema, labels that agree with the oracle, prompt files."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from diffalign import toy
from diffalign.toy import pairs

PAIRS = toy.toy_pairs_path()
PARQUET = PAIRS / pairs.PARQUET_NAME
needs_pairs = pytest.mark.skipif(not PARQUET.exists(), reason=f"{PARQUET} not built")

PICKAPIC_COLUMNS = {
    "caption": "string",
    "jpg_0": "binary",
    "jpg_1": "binary",
    "label_0": "double",
    "label_1": "double",
    "user_id": "int64",
    "ranking_id": "int64",
}


@pytest.fixture(scope="module")
def table():
    import pyarrow.parquet as pq

    return pq.read_table(PARQUET)


def test_label_pairs_by_hand():
    """rewards (1.0, 0.5), (0.2, 0.9), (0.700, 0.705): image 0 wins, image 1 wins, tie within margin 0.01."""
    label_0, label_1 = pairs.label_pairs(np.array([1.0, 0.2, 0.700]), np.array([0.5, 0.9, 0.705]), tie_margin=0.01)
    np.testing.assert_array_equal(label_0, [1.0, 0.0, 0.5])
    np.testing.assert_array_equal(label_1, [0.0, 1.0, 0.5])


@needs_pairs
def test_schema(table):
    types = {f.name: str(f.type) for f in table.schema}
    for name, type_ in PICKAPIC_COLUMNS.items():
        assert types[name] == type_, name
    assert 300 <= table.num_rows <= 1000
    assert PARQUET.stat().st_size < 5_000_000


@needs_pairs
def test_loads_with_datasets():
    from datasets import load_dataset

    ds = load_dataset("parquet", data_files=str(PARQUET), split="train")
    row = ds[0]
    assert set(PICKAPIC_COLUMNS) <= set(ds.column_names)
    assert Image.open(io.BytesIO(row["jpg_0"])).size == (32, 32)
    assert row["label_0"] + row["label_1"] == 1.0


@needs_pairs
def test_labels_agree_with_the_oracle(table):
    """Decode every PNG, rescore it: same rewards as stored, and the labels follow from them."""
    cols = table.to_pydict()
    decode = [Image.open(io.BytesIO(b)).convert("RGB") for b in cols["jpg_0"] + cols["jpg_1"]]
    rewards = toy.oracle_reward(decode, cols["caption"] + cols["caption"])
    n = table.num_rows
    np.testing.assert_allclose(rewards[:n], cols["reward_0"], atol=1e-9)
    np.testing.assert_allclose(rewards[n:], cols["reward_1"], atol=1e-9)
    report = json.loads((PAIRS / pairs.REPORT_NAME).read_text())
    label_0, label_1 = pairs.label_pairs(rewards[:n], rewards[n:], tie_margin=report["tie_margin"])
    np.testing.assert_array_equal(label_0, cols["label_0"])
    np.testing.assert_array_equal(label_1, cols["label_1"])
    assert report["stats"]["n_pairs"] == n and report["stats"]["n_ties"] == int((label_0 == 0.5).sum())


@needs_pairs
def test_prompt_files(table):
    train = (PAIRS / "train_prompts.txt").read_text().splitlines()
    held = (PAIRS / "heldout_prompts.txt").read_text().splitlines()
    assert train == toy.train_prompts() and held == toy.heldout_prompts()
    assert not set(train) & set(held)
    assert set(table.column("caption").to_pylist()) <= set(train)
