"""User encoders: fixed feature shapes, pooling over examples, the token projection, example files."""

import pytest
import torch
from PIL import Image

from diffalign.personalization import (
    ClipUserEncoder,
    PixelUserEncoder,
    PreferenceExample,
    UserEncoderConfig,
    UserProjection,
    load_examples,
    save_examples,
)
from diffalign.personalization.user_encoder import encoder_feature_shape

RED, BLUE, GREEN = (220, 40, 40), (40, 70, 220), (40, 170, 60)


def example(prompt, chosen, rejected, size=(40, 36)):
    return PreferenceExample(prompt, Image.new("RGB", size, chosen), Image.new("RGB", size, rejected))


EXAMPLES = [example("a red circle", RED, BLUE), example("a green square", GREEN, BLUE),
            example("a blue circle on a red background", RED, GREEN)]


def test_pixel_encoder_is_mean_chosen_minus_rejected_thumbnail():
    enc = PixelUserEncoder(grid=2)
    f = enc.encode(EXAMPLES[:2])
    assert f.shape == enc.feature_shape == (1, 12)
    # every thumbnail pixel of a solid image is its colour in [-1, 1]; mean over the two examples
    want = ((torch.tensor(RED) - torch.tensor(BLUE)) + (torch.tensor(GREEN) - torch.tensor(BLUE))) / 2 / 127.5
    torch.testing.assert_close(f[0].view(3, 2, 2)[:, 0, 0], want.float(), atol=1e-5, rtol=0)


def test_saliency_encoder_sees_where_the_object_is_whatever_its_colour():
    import numpy as np

    def square_at(col, fg, bg):  # a 16x16 square in the top-left (col 0) or top-right (col 16) quadrant
        a = np.zeros((32, 32, 3), np.uint8)
        a[:] = bg
        a[:16, col:col + 16] = fg
        return Image.fromarray(a)

    enc = PixelUserEncoder(grid=2, channels="saliency")
    assert enc.feature_shape == (1, 4) == encoder_feature_shape(UserEncoderConfig(type="pixels", grid=2,
                                                                                  channels="saliency"))

    def dist(a, b):  # RGB distance in [0, 1] units, divided by sqrt(3)
        return float(np.sqrt((((np.array(a) - np.array(b)) / 255.0) ** 2).sum() / 3))

    # chosen: object on the right, rejected: on the left; two colour schemes
    ex = [PreferenceExample("p", square_at(16, RED, BLUE), square_at(0, RED, BLUE)),
          PreferenceExample("q", square_at(16, GREEN, RED), square_at(0, GREEN, RED))]
    f = enc.encode(ex)[0].view(2, 2)  # rows: top, bottom; columns: left, right
    d = (dist(RED, BLUE) + dist(GREEN, RED)) / 2
    torch.testing.assert_close(f, torch.tensor([[-d, d], [0.0, 0.0]]), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="channels"):
        UserEncoderConfig(type="pixels", channels="hsv")


def test_clip_encoder_shapes_order_invariance_and_batching():
    enc = ClipUserEncoder("tiny")
    f = enc.encode(EXAMPLES)
    assert f.shape == enc.feature_shape == (2, 16) == encoder_feature_shape(UserEncoderConfig(model="tiny"))
    torch.testing.assert_close(enc.encode(EXAMPLES[::-1]), f, atol=1e-6, rtol=1e-5)  # mean over examples
    batched = enc.encode_users([EXAMPLES, EXAMPLES[:1]])
    assert batched.shape == (2, 2, 16)
    torch.testing.assert_close(batched[1], enc.encode(EXAMPLES[:1]), atol=1e-6, rtol=1e-5)
    swapped = enc.encode([PreferenceExample(e.prompt, e.rejected, e.chosen) for e in EXAMPLES])
    torch.testing.assert_close(swapped[0], -f[0], atol=1e-6, rtol=1e-5)  # preference flipped: difference row negates
    torch.testing.assert_close(swapped[1], f[1])  # the prompt row does not depend on the labels
    with pytest.raises(ValueError, match="at least one"):
        enc.encode([])


def test_projection_maps_features_to_tokens():
    torch.manual_seed(0)
    proj = UserProjection((2, 16), num_tokens=4, token_dim=32)
    f = torch.randn(5, 2, 16)
    tokens = proj(f)
    assert tokens.shape == (5, 4, 32)
    assert proj(torch.randn(2, 16)).shape == (1, 4, 32)
    # rows are scaled to unit norm (scale-free) and the map has no bias: at init, opposite features -> opposite tokens
    torch.testing.assert_close(proj(0.5 * f), tokens, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(proj(-f), -tokens, atol=1e-5, rtol=1e-5)
    # the direction survives, also in 2 dimensions: (1, 0.1) and (1, -0.1) are different users (a per-row
    # standardisation maps both to (1, -1)); by hand, the tokens are LayerNorm(W f / ‖f‖)
    two = UserProjection((1, 2), num_tokens=2, token_dim=8)
    a, b = two(torch.tensor([[1.0, 0.1]])), two(torch.tensor([[1.0, -0.1]]))
    assert (a - b).abs().max() > 0.1
    u = torch.tensor([1.0, 0.1]) / torch.tensor([1.0, 0.1]).norm()
    want = torch.nn.functional.layer_norm((two.proj.weight @ u).view(2, 8), (8,), two.norm.weight, two.norm.bias)
    torch.testing.assert_close(a[0], want, atol=1e-5, rtol=1e-5)
    # fitted per-dimension scale: RMS over the sets; tokens = LayerNorm(W (f / s) / ‖f / s‖)
    sets = torch.tensor([[[0.02, 1.0]], [[-0.04, 2.0]], [[0.0, 0.0]]])
    two.fit_feature_scale(sets)
    s = torch.tensor([(0.02**2 + 0.04**2) / 3, 5.0 / 3]).sqrt()
    torch.testing.assert_close(two.feature_scale[0], s)
    g = torch.tensor([0.02, 1.0]) / s
    want = torch.nn.functional.layer_norm((two.proj.weight @ (g / g.norm())).view(2, 8), (8,), two.norm.weight,
                                          two.norm.bias)
    torch.testing.assert_close(two(sets[0])[0], want, atol=1e-5, rtol=1e-5)
    assert "feature_scale" in two.state_dict()  # saved and loaded with the branch


def test_examples_file_round_trip(tmp_path):
    path = save_examples(EXAMPLES, tmp_path / "me.jsonl")
    back = load_examples(path)
    assert [e.prompt for e in back] == [e.prompt for e in EXAMPLES]
    assert back[0].chosen.getpixel((0, 0)) == RED and back[0].rejected.getpixel((0, 0)) == BLUE
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "chosen": "a.png"}\n')
    with pytest.raises(ValueError, match="lacks"):
        load_examples(bad)


def test_centred_saliency_thumbnails_do_not_depend_on_where_the_object_is():
    """centre=True: the same 8x4 bar at two places gives the same features; a wide and a tall bar differ; by hand on
    a 2x2 grid the centred wide bar covers columns 12..19 of rows 14..17 -> every quadrant holds 8 of its pixels."""
    import numpy as np

    from diffalign.personalization.user_encoder import centre_maps

    def bar(x0, y0, w, h):
        a = np.zeros((32, 32, 3), np.uint8)
        a[:] = BLUE
        a[y0:y0 + h, x0:x0 + w] = RED
        return Image.fromarray(a)

    enc = PixelUserEncoder(grid=2, channels="saliency", centre=True)
    plain = PixelUserEncoder(grid=2, channels="saliency")
    wide_a, wide_b = bar(0, 0, 8, 4), bar(20, 25, 8, 4)
    torch.testing.assert_close(enc.embed_images([wide_a]), enc.embed_images([wide_b]))
    assert not torch.allclose(plain.embed_images([wide_a]), plain.embed_images([wide_b]))
    s = float(np.sqrt((((np.array(RED) - np.array(BLUE)) / 255.0) ** 2).sum() / 3))
    torch.testing.assert_close(enc.embed_images([wide_a])[0], torch.full((4,), 8 * s / 256), atol=1e-6, rtol=0)
    maps = centre_maps(np.stack([np.asarray(m) for m in [np.pad(np.ones((4, 8), np.float32), ((0, 28), (0, 24)))]]))
    assert maps[0, 14:18, 12:20].sum() == 32 and maps.sum() == 32  # moved whole, centroid on (16, 16)
    # wide minus tall: a wide bar has mass in the side columns of an 8x8 grid, a tall one in the top/bottom rows
    wide, tall = bar(1, 2, 16, 8), bar(15, 9, 8, 16)  # centred: columns 8..23 x rows 12..19, and transposed
    f = PixelUserEncoder(grid=8, channels="saliency", centre=True).encode([PreferenceExample("p", wide, tall)])
    grid = f[0].view(8, 8)
    assert grid[3:5, 2].sum() > 0 and grid[3:5, 5].sum() > 0 and grid[2, 3:5].sum() < 0 and grid[5, 3:5].sum() < 0
    np.testing.assert_array_equal(centre_maps(np.zeros((1, 4, 4))), np.zeros((1, 4, 4)))  # nothing to centre
    with pytest.raises(ValueError, match="centre"):
        UserEncoderConfig(type="pixels", channels="rgb", centre=True)


def test_saliency_luma_channel_is_the_objects_lightness_against_the_background():
    """2x2 grid, centred: a light and a dark version of one 16x16 square (anywhere) differ only in the luma half;
    by hand the luma thumbnail is (mean RGB of the object - of the background) over each quadrant's 64 of 256 px."""
    import numpy as np

    def square_at(x0, y0, fg, bg=BLUE):
        a = np.zeros((32, 32, 3), np.uint8)
        a[:] = bg
        a[y0:y0 + 16, x0:x0 + 16] = fg
        return Image.fromarray(a)

    light, dark = (250, 150, 150), (120, 20, 20)
    enc = PixelUserEncoder(grid=2, channels="saliency_luma", centre=True)
    assert enc.feature_shape == (1, 8) == encoder_feature_shape(UserEncoderConfig(type="pixels", grid=2,
                                                                                  channels="saliency_luma"))
    f = enc.encode([PreferenceExample("p", square_at(0, 3, light), square_at(13, 16, dark))])[0]
    luma = lambda c: sum(c) / 3 / 255
    want = (luma(light) - luma(dark)) * 64 / 256
    torch.testing.assert_close(f[4:], torch.full((4,), want), atol=1e-6, rtol=0)
    sal = enc.embed_images([square_at(0, 3, light), square_at(13, 16, dark)])[:, :4]
    assert (sal > 0).all()  # both objects are seen; their saliency differs with their colour, the luma says how


def test_object_channel_is_the_difference_of_object_statistics_worked_by_hand():
    import numpy as np

    def rect(x0, y0, w, h, fg, bg=BLUE):
        a = np.zeros((32, 32, 3), np.uint8)
        a[:] = bg
        a[y0:y0 + h, x0:x0 + w] = fg
        return Image.fromarray(a)

    wide_red, tall_grey = rect(4, 2, 16, 8, RED), rect(20, 10, 6, 20, (100, 100, 100))
    stats = lambda w, h, rgb: [w * h / 1024, sum(rgb) / 3 / 255, 0.5 * np.log((w * w - 1) / (h * h - 1))]
    enc = PixelUserEncoder(channels="object")
    assert enc.feature_shape == (1, 3) == encoder_feature_shape(UserEncoderConfig(type="pixels", channels="object"))
    f = enc.encode([PreferenceExample("p", wide_red, tall_grey)])[0]  # (N_f, D) = (1, 3) -> (3,)
    want = np.array(stats(16, 8, RED)) - np.array(stats(6, 20, (100, 100, 100)))
    np.testing.assert_allclose(f.numpy(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(enc.embed_images([Image.new("RGB", (32, 32), BLUE)]), torch.zeros(1, 3))  # no object
    with pytest.raises(ValueError, match="centre"):
        UserEncoderConfig(type="pixels", channels="object", centre=True)

