"""Procedural data: captions, the TRAIN / HELD-OUT split and deterministic rendering."""

from itertools import combinations

import numpy as np
import pytest

from diffalign.toy import shapes


def test_caption_round_trip():
    for combo in shapes.all_combos():
        assert shapes.parse_caption(shapes.make_caption(*combo)) == combo
    with pytest.raises(ValueError, match="not a toy caption"):
        shapes.parse_caption("a red dog on a blue background")


def test_split_is_disjoint_and_complete():
    train, held = shapes.train_prompts(), shapes.heldout_prompts()
    assert len(train) == 78 and len(held) == 12
    assert not set(train) & set(held)
    assert sorted(train + held) == sorted(shapes.make_caption(*c) for c in shapes.all_combos())


def test_heldout_attribute_pairs_are_seen_in_training():
    """Compositional split: each attribute pair of a held-out prompt occurs in >= 1 training prompt."""
    train = [shapes.parse_caption(p) for p in shapes.train_prompts()]
    for combo in shapes.HELDOUT_COMBOS:
        for i, j in combinations(range(3), 2):
            assert any((t[i], t[j]) == (combo[i], combo[j]) for t in train), (combo, i, j)


def test_render_is_deterministic_and_in_range():
    captions = shapes.sample_captions(40, seed=3)
    a, specs = shapes.render_batch(captions, seed=3)
    b, _ = shapes.render_batch(captions, seed=3)
    c, _ = shapes.render_batch(captions, seed=4)
    assert a.shape == (40, 32, 32, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    for spec in specs:
        assert shapes.MIN_HALF_SIZE <= spec.half_size <= shapes.MAX_HALF_SIZE
        assert spec.half_size <= spec.cx <= 32 - spec.half_size and spec.half_size <= spec.cy <= 32 - spec.half_size


def test_sample_captions_is_balanced():
    caps = shapes.sample_captions(2 * 78, seed=0)
    assert sorted(caps) == sorted(shapes.train_prompts() * 2)
