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


def test_aspect_jitter_draws_elongated_shapes_and_zero_keeps_the_old_stream():
    captions = shapes.sample_captions(40, seed=3)
    plain, plain_specs = shapes.render_batch(captions, seed=3)
    zero, zero_specs = shapes.render_batch(captions, seed=3, aspect_jitter=0.0)
    np.testing.assert_array_equal(plain, zero)
    assert all(s.aspect == 0.0 for s in zero_specs) and zero_specs == plain_specs
    _, specs = shapes.render_batch(captions, seed=3, aspect_jitter=0.5)
    alphas = np.array([s.aspect for s in specs])
    assert np.abs(alphas).max() <= 0.5 and alphas.min() < -0.25 and alphas.max() > 0.25
    for spec in specs:
        w, h = spec.half_extents
        np.testing.assert_allclose([w / h, w * h], [np.exp(spec.aspect), spec.half_size ** 2])
        assert w <= spec.cx <= 32 - w and h <= spec.cy <= 32 - h  # the whole shape stays on the canvas
    # a square spec with alpha = log 2 renders as a 2:1 rectangle (box edges at 16 +- 8 and 16 +- 4)
    img = np.asarray(shapes.render(shapes.ShapeSpec("red", "square", "blue", 4 * 2 ** 0.5, 16, 16, float(np.log(2)))))
    red = (img == shapes.COLOURS["red"]).all(-1)
    ys, xs = np.nonzero(red)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (8, 23, 12, 19)
    with pytest.raises(ValueError, match="aspect_jitter"):
        shapes.render_batch(captions, seed=3, aspect_jitter=1.0)


def test_shade_jitter_blends_the_colour_toward_white_or_black():
    captions = shapes.sample_captions(40, seed=3)
    _, plain_specs = shapes.render_batch(captions, seed=3)
    _, specs = shapes.render_batch(captions, seed=3, shade_jitter=0.3)
    lam = np.array([s.shade for s in specs])
    assert np.abs(lam).max() <= 0.3 and lam.min() < -0.15 and lam.max() > 0.15
    # the shade is drawn after size and position: the first image's are those of the unshaded stream
    assert (specs[0].half_size, specs[0].cx, specs[0].cy) == (plain_specs[0].half_size, plain_specs[0].cx, plain_specs[0].cy)
    red = shapes.COLOURS["red"]  # (220, 40, 40)
    lighter = shapes.ShapeSpec("red", "square", "blue", 8, 16, 16, shade=0.5)
    darker = shapes.ShapeSpec("red", "square", "blue", 8, 16, 16, shade=-0.25)
    assert lighter.fill == (238, 148, 148) and darker.fill == (165, 30, 30)  # 220 + 0.5·35 = 237.5 -> 238
    assert shapes.ShapeSpec("red", "square", "blue", 8, 16, 16).fill == red
    img = np.asarray(shapes.render(darker))
    assert tuple(img[16, 16]) == (165, 30, 30)
    with pytest.raises(ValueError, match="shade_jitter"):
        shapes.render_batch(captions, seed=3, shade_jitter=0.5)


def test_background_jitter_shades_the_background_after_the_shape():
    captions = shapes.sample_captions(40, seed=3)
    _, shaded = shapes.render_batch(captions, seed=3, shade_jitter=0.3)
    _, specs = shapes.render_batch(captions, seed=3, shade_jitter=0.3, background_jitter=0.3)
    mu = np.array([s.background_shade for s in specs])
    assert np.abs(mu).max() <= 0.3 and mu.min() < -0.15 and mu.max() > 0.15
    # drawn after the shape's shade: the first image's size, position and shade are those of the stream without it
    first, same = specs[0], shaded[0]
    assert (first.half_size, first.cx, first.cy, first.shade) == (same.half_size, same.cx, same.cy, same.shade)
    spec = shapes.ShapeSpec("red", "square", "blue", 8, 16, 16, background_shade=-0.5)
    assert spec.background_fill == (20, 35, 110) and spec.fill == shapes.COLOURS["red"]  # blue (40, 70, 220) / 2
    img = np.asarray(shapes.render(spec))
    assert tuple(img[0, 0]) == (20, 35, 110) and tuple(img[16, 16]) == shapes.COLOURS["red"]
    with pytest.raises(ValueError, match="background_jitter"):
        shapes.render_batch(captions, seed=3, background_jitter=0.5)


def test_cast_jitter_blends_both_colours_toward_warm_or_cold():
    captions = shapes.sample_captions(40, seed=3)
    _, before = shapes.render_batch(captions, seed=3, shade_jitter=0.3, background_jitter=0.3)
    _, specs = shapes.render_batch(captions, seed=3, shade_jitter=0.3, background_jitter=0.3, cast_jitter=0.2)
    tau = np.array([s.cast for s in specs])
    assert np.abs(tau).max() <= 0.2 and tau.min() < -0.1 and tau.max() > 0.1
    assert (specs[0].shade, specs[0].background_shade) == (before[0].shade, before[0].background_shade)  # drawn last
    warm = shapes.ShapeSpec("red", "square", "blue", 8, 16, 16, cast=0.5)
    cold = shapes.ShapeSpec("red", "square", "blue", 8, 16, 16, cast=-0.25)
    # red (220, 40, 40), blue (40, 70, 220); warm (255, 128, 0), cold (0, 128, 255); .5 rounds to even
    assert warm.fill == (238, 84, 20) and warm.background_fill == (148, 99, 110)
    assert cold.fill == (165, 62, 94) and cold.background_fill == (30, 84, 229)
    img = np.asarray(shapes.render(cold))
    assert tuple(img[0, 0]) == (30, 84, 229) and tuple(img[16, 16]) == (165, 62, 94)
    with pytest.raises(ValueError, match="cast_jitter"):
        shapes.render_batch(captions, seed=3, cast_jitter=0.5)


def test_sample_captions_is_balanced():
    caps = shapes.sample_captions(2 * 78, seed=0)
    assert sorted(caps) == sorted(shapes.train_prompts() * 2)
