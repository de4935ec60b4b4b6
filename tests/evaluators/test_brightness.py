"""``load("brightness")``: the mean Rec. 601 luma, worked by hand on solid and split images."""

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.evaluators import load


def test_brightness_is_the_mean_luma():
    scorer = load("brightness")
    half = np.zeros((4, 4, 3), dtype=np.uint8)
    half[:, :2] = (0, 255, 0)  # half green, half black
    images = [Image.new("RGB", (4, 4), (255, 0, 0)), Image.new("RGB", (4, 4), (255, 255, 255)),
              Image.fromarray(half), Image.new("RGB", (4, 4), (0, 0, 255))]
    got = scorer.score(images, ["ignored"] * 4)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.tensor([0.299, 1.0, 0.587 / 2, 0.114]), rtol=0, atol=1e-6)


def test_brightness_takes_no_weights():
    with pytest.raises(ValueError, match="no weights"):
        load("brightness", weights="some/dir")
