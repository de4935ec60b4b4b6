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
    # rows are standardised (scale-free) and the map has no bias: at init, opposite features -> opposite tokens
    torch.testing.assert_close(proj(0.5 * f), tokens, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(proj(-f), -tokens, atol=1e-5, rtol=1e-5)


def test_examples_file_round_trip(tmp_path):
    path = save_examples(EXAMPLES, tmp_path / "me.jsonl")
    back = load_examples(path)
    assert [e.prompt for e in back] == [e.prompt for e in EXAMPLES]
    assert back[0].chosen.getpixel((0, 0)) == RED and back[0].rejected.getpixel((0, 0)) == BLUE
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "chosen": "a.png"}\n')
    with pytest.raises(ValueError, match="lacks"):
        load_examples(bad)
