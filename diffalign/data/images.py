"""Image decoding and the joint winner/loser transform.

Winner and loser get the **same** resize, crop and flip (the official Diffusion-DPO code draws them independently,
which makes the pair differ by an augmentation the preference never saw).
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

MAX_IMAGE_PIXELS = 16384 * 16384


class UnreadableImage(ValueError):
    """An image that could not be decoded; the sample is skipped and counted."""


def decode_image(value, base_dir: Path | None = None) -> Image.Image:
    """bytes | {"bytes", "path"} | path | PIL image -> RGB PIL image (grayscale, RGBA, CMYK, P are converted)."""
    try:
        if isinstance(value, Image.Image):
            img = value
        elif isinstance(value, (bytes, bytearray)):
            img = Image.open(io.BytesIO(value))
        elif isinstance(value, dict):
            if value.get("bytes"):
                img = Image.open(io.BytesIO(value["bytes"]))
            elif value.get("path"):
                return decode_image(value["path"], base_dir)
            else:
                raise UnreadableImage("empty image record")
        elif isinstance(value, (str, Path)):
            path = Path(value)
            if base_dir is not None and not path.is_absolute():
                path = base_dir / path
            img = Image.open(path)
        else:
            raise UnreadableImage(f"unsupported image value of type {type(value).__name__}")
        if img.width * img.height > MAX_IMAGE_PIXELS:
            raise UnreadableImage(f"image too large ({img.width}x{img.height})")
        img.load()
        if img.width == 0 or img.height == 0:
            raise UnreadableImage("zero-size image")
        return img.convert("RGB")
    except UnreadableImage:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise UnreadableImage(str(err)) from None


@dataclass
class PairTransform:
    """Resize the shorter side to ``resolution``, crop (center or random) and flip (p=0.5) **jointly**.

    The loser is first resized to the winner's size (as MaPO/diffusers SDXL do), so one crop fits both.
    Returns tensors in [-1, 1] of shape (3, R, R), the winner's original (h, w) and the crop's (top, left).
    """

    resolution: int = 512
    center_crop: bool = True
    random_flip: bool = True

    def decide(self, rng: random.Random, size_hw: tuple[int, int]) -> tuple[int, int, bool]:
        """The random choices for one pair: crop (top, left) in the resized image, and flip."""
        flip = self.decide_flip(rng)  # drawn first: with a center crop it is the only random choice
        h, w = size_hw
        scale = self.resolution / min(h, w)
        rh, rw = max(self.resolution, round(h * scale)), max(self.resolution, round(w * scale))
        if self.center_crop:
            top, left = (rh - self.resolution) // 2, (rw - self.resolution) // 2
        else:
            top, left = rng.randint(0, rh - self.resolution), rng.randint(0, rw - self.resolution)
        return top, left, flip

    def decide_flip(self, rng: random.Random) -> bool:
        return self.random_flip and rng.random() < 0.5

    def __call__(self, img_w: Image.Image, img_l: Image.Image, rng: random.Random):
        if img_l.size != img_w.size:
            img_l = img_l.resize(img_w.size, Image.BILINEAR)
        h, w = img_w.height, img_w.width
        top, left, flip = self.decide(rng, (h, w))
        scale = self.resolution / min(h, w)
        size = (max(self.resolution, round(w * scale)), max(self.resolution, round(h * scale)))  # PIL: (w, h)
        out = []
        for img in (img_w, img_l):
            img = img.resize(size, Image.BILINEAR).crop((left, top, left + self.resolution, top + self.resolution))
            if flip:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
            out.append(to_tensor(img))
        return out[0], out[1], (h, w), (top, left), flip


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> float tensor (3, H, W) in [-1, 1]."""
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()
