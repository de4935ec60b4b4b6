"""The oracle reward: right captions beat wrong ones, bigger shapes have more taste, input formats agree."""

import numpy as np
import torch

from diffalign.toy import oracle, shapes


def _clean_batch(n=120, seed=0):
    captions = shapes.sample_captions(n, seed, shapes.train_prompts() + shapes.heldout_prompts())
    images, specs = shapes.render_batch(captions, seed)
    return images, captions, specs


def _swap(spec, kind):
    c, s, b = spec.colour, spec.shape, spec.background
    if kind == "shape":
        s = shapes.SHAPES[(shapes.SHAPES.index(s) + 1) % 3]
    elif kind == "colour":
        c = next(x for x in shapes.COLOURS if x not in (c, b))
    else:
        b = next(x for x in shapes.COLOURS if x not in (c, b))
    return shapes.make_caption(c, s, b)


def test_clean_renderings_match_their_captions():
    images, captions, _ = _clean_batch()
    terms = oracle.oracle_terms(images, captions)
    assert set(terms) == set(oracle.TERMS)
    assert terms["match"].mean() >= 0.97
    assert terms["caption"].mean() >= 0.95


def test_wrong_caption_scores_lower():
    """Same pixels, one attribute of the caption changed: no match and a lower reward in (almost) every case."""
    images, captions, specs = _clean_batch()
    right = oracle.oracle_terms(images, captions)
    for kind in ("shape", "colour", "background"):
        wrong = oracle.oracle_terms(images, [_swap(s, kind) for s in specs])
        assert wrong["match"].mean() <= 0.02, kind
        assert (right["reward"] > wrong["reward"]).mean() >= 0.97, kind


def test_wrong_rendering_scores_lower():
    """Same caption, a rendering with the wrong shape or colour."""
    spec = shapes.ShapeSpec("red", "triangle", "blue", 9.0, 16.0, 16.0)
    good = shapes.render(spec)
    bad_shape = shapes.render(shapes.ShapeSpec("red", "square", "blue", 9.0, 16.0, 16.0))
    bad_colour = shapes.render(shapes.ShapeSpec("yellow", "triangle", "blue", 9.0, 16.0, 16.0))
    r = oracle.oracle_reward([good, bad_shape, bad_colour], [spec.caption] * 3)
    assert r[0] > 1.3 and r[0] > r[1] + 0.2 and r[0] > r[2] + 0.5


def test_taste_increases_with_size():
    sizes = np.linspace(shapes.MIN_HALF_SIZE, shapes.MAX_HALF_SIZE, 9)
    for shape in shapes.SHAPES:
        specs = [shapes.ShapeSpec("green", shape, "white", s, 16.0, 16.0) for s in sizes]
        terms = oracle.oracle_terms([shapes.render(s) for s in specs], [s.caption for s in specs])
        assert np.all(np.diff(terms["taste"]) >= 0), shape
        assert np.all(np.diff(terms["reward"]) > -0.05), shape
        assert terms["taste"][-1] - terms["taste"][0] >= 0.9, shape
        np.testing.assert_allclose(terms["half_size"], sizes, atol=0.6)


def test_input_formats_agree():
    images, captions, _ = _clean_batch(8)
    from_uint8 = oracle.oracle_reward(images, captions)
    as_float = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255  # (N, 3, H, W) in [0, 1]
    from PIL import Image

    np.testing.assert_allclose(oracle.oracle_reward(as_float, captions), from_uint8)
    np.testing.assert_allclose(oracle.oracle_reward([Image.fromarray(x) for x in images], captions), from_uint8)
    assert from_uint8.shape == (8,) and from_uint8.dtype == np.float64


def test_empty_image_scores_zero_colour():
    blank = np.zeros((1, 32, 32, 3), dtype=np.uint8) + np.array(shapes.COLOURS["blue"], dtype=np.uint8)
    terms = oracle.oracle_terms(blank, ["a red circle on a blue background"])
    assert terms["match"][0] == 0 and terms["colour"][0] == 0 and terms["taste"][0] == 0
