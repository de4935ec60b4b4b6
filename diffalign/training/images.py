"""Image grids for validation and reports."""

from __future__ import annotations

import math
import os
from pathlib import Path

from PIL import Image


def make_grid(images: list[Image.Image], cols: int | None = None, pad: int = 2) -> Image.Image:
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + pad) + pad), "white")
    for i, img in enumerate(images):
        grid.paste(img.convert("RGB"), (pad + (i % cols) * (w + pad), pad + (i // cols) * (h + pad)))
    return grid


def save_grid(images: list[Image.Image], path: str | os.PathLike, cols: int | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    make_grid(images, cols).save(tmp)
    os.replace(tmp, path)
    return path
