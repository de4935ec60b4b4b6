"""Seeded test images and prompts shared by the parity tests and ``official/make_official_fixtures.py``.

Only numpy + PIL, so the same cases can be rebuilt inside the side environments that run the official packages.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# name -> (height, width, mode)
IMAGE_SPECS = {
    "square512": (512, 512, "RGB"),
    "landscape": (480, 640, "RGB"),
    "portrait": (640, 480, "RGB"),
    # shortest side 225 -> long side 299: (299 - 224) is odd, so floor and round crop offsets differ by one pixel
    "oddcrop": (225, 301, "RGB"),
    "tallthin": (900, 300, "RGB"),
    "rgba": (300, 300, "RGBA"),
}

PROMPTS = [
    "a cat",
    "A watercolor painting of an old castle on a hill at sunset, golden light, detailed",
    # > 77 CLIP tokens and > 35 BERT tokens
    " ".join(["a red dragon flying over a dark forest with clouds and a river"] * 8),
    "café crème brûlée — 東京の夜 🌃",
    "",
    "photo of a dog",
]


def make_image(name: str, seed: int = 0) -> Image.Image:
    """A smooth random field plus fine noise (so resize kernels matter), in the spec's size and mode."""
    h, w, mode = IMAGE_SPECS[name]
    rng = np.random.default_rng(seed + sum(map(ord, name)))
    coarse = rng.integers(0, 256, size=(8, 8, 4), dtype=np.uint8)
    base = np.asarray(Image.fromarray(coarse, "RGBA").resize((w, h), Image.BILINEAR), dtype=np.int16)
    noise = rng.integers(-40, 41, size=(h, w, 4), dtype=np.int16)
    array = np.clip(base + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(array, "RGBA")
    return image if mode == "RGBA" else image.convert(mode)


def make_images(seed: int = 0) -> dict[str, Image.Image]:
    return {name: make_image(name, seed) for name in IMAGE_SPECS}


def pairs() -> list[tuple[str, str]]:
    """(image name, prompt) pairs: every image once, every prompt at least once."""
    names = list(IMAGE_SPECS)
    n = max(len(names), len(PROMPTS))
    return [(names[i % len(names)], PROMPTS[i % len(PROMPTS)]) for i in range(n)]
