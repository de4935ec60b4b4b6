"""Oracle reward for the toy world: a deterministic function of pixels and caption.

For an image ``x`` (32x32 RGB in [0, 1]) and a caption naming colour ``c``, shape ``k`` and background ``b``:

1. **Segment.** Every pixel gets the nearest palette colour (Euclidean RGB). ``F`` is the largest 8-connected
   component of the pixels nearest to ``c``; ``B`` is the set of pixels nearest to ``b``.
2. **Caption terms**, each in [0, 1]:

   ============  ====================================================================================================
   term          definition
   ============  ====================================================================================================
   background    ``|B| / (N - |F|)``: the share of pixels outside the shape that have the background colour
   colour        ``|F| / (N - |B| - |E|)`` times ``min(1, |F| / 16)``: the share of non-background pixels in one
                 blob of the shape colour, damped when the blob is smaller than 16 px. ``E`` are edge pixels: not in
                 ``F`` or ``B`` but within 0.1 of the RGB segment from ``c`` to ``b`` (anti-aliased blends of the two)
   shape         softmax over classes of ``τ · IoU(F, template_j)`` at the caption's class, where ``template_j`` is
                 shape ``j`` drawn in ``F``'s bounding box (τ = 25)
   ============  ====================================================================================================

   ``caption = (background + colour + shape) / 3``.
3. **Taste** (what pretraining does not teach): bigger shapes. The half-extent ``s`` of ``F`` (half the mean side
   of its bounding box, in px) is mapped to ``taste = clip((s - 6) / (12 - 6), 0, 1)``; the training data draws
   ``s ~ U[6, 12]``, so a base model's taste is spread around 0.5.
4. ``reward = caption + taste_weight · taste`` (``taste_weight = 1``), range [0, 2].

``match`` is 1 when the image shows the caption: background ≥ 0.8, colour ≥ 0.7 and the best-fitting template is the
caption's shape. Clean renderings from :func:`diffalign.toy.shapes.render` match 100 % of the time
(``tests/toy/test_oracle.py``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from .shapes import COLOURS, MAX_HALF_SIZE, MIN_HALF_SIZE, SHAPES, parse_caption

TERMS = ("background", "colour", "shape", "caption", "half_size", "taste", "match", "reward")

_PALETTE = np.array(list(COLOURS.values()), dtype=np.float32) / 255.0  # (C, 3)
_COLOUR_INDEX = {name: i for i, name in enumerate(COLOURS)}
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
MIN_SHAPE_AREA = 16  # px; a U[6, 12] shape covers at least 72 px (the smallest triangle)
SHAPE_TEMPERATURE = 25.0
BACKGROUND_OK = 0.8
COLOUR_OK = 0.7
EDGE_TOLERANCE = 0.1  # RGB in [0, 1]; palette colours are >= 0.43 apart


def as_numpy_images(images) -> np.ndarray:
    """Images as float32 (N, H, W, 3) in [0, 1].

    Accepts a list of PIL images, a float tensor/array (N, 3, H, W) in [0, 1], or a uint8 array (N, H, W, 3).
    """
    if isinstance(images, torch.Tensor):
        images = images.detach().float().cpu().numpy()
    if isinstance(images, np.ndarray):
        if images.dtype == np.uint8:
            return images.astype(np.float32) / 255.0
        if images.ndim == 4 and images.shape[1] == 3 and images.shape[-1] != 3:
            images = images.transpose(0, 2, 3, 1)  # (N, 3, H, W) -> (N, H, W, 3)
        return np.clip(images.astype(np.float32), 0.0, 1.0)
    if isinstance(images, Image.Image):
        images = [images]
    return np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])


def shape_template(shape: str, box: tuple[float, float, float, float], size: tuple[int, int]) -> np.ndarray:
    """Boolean mask (H, W) of ``shape`` inscribed in ``box = (x0, y0, x1, y1)`` (continuous pixel coordinates)."""
    h, w = size
    x0, y0, x1, y1 = box
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, max((x1 - x0) / 2, 0.5), max((y1 - y0) / 2, 0.5)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5  # pixel centres
    u, v = (xs - cx) / rx, (ys - cy) / ry  # box -> [-1, 1]^2
    inside = (np.abs(u) <= 1) & (np.abs(v) <= 1)
    if shape == "circle":
        return u**2 + v**2 <= 1
    if shape == "square":
        return inside
    if shape == "triangle":
        # apex (0, -1), base y = +1 from (-1, 1) to (1, 1): |u| <= (v + 1) / 2
        return inside & (np.abs(u) <= (v + 1) / 2)
    raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def _terms_one(image: np.ndarray, caption: str, taste_weight: float) -> dict[str, float]:
    colour, shape, background = parse_caption(caption)
    h, w, _ = image.shape
    n = h * w
    dist = ((image[:, :, None, :] - _PALETTE[None, None]) ** 2).sum(-1)  # (H, W, C)
    nearest = dist.argmin(-1)  # (H, W)
    bg_mask = nearest == _COLOUR_INDEX[background]
    labels, n_blobs = ndimage.label(nearest == _COLOUR_INDEX[colour], structure=_EIGHT_CONNECTED)
    if n_blobs:
        sizes = np.bincount(labels.ravel())[1:]
        fg = labels == (1 + int(sizes.argmax()))
    else:
        fg = np.zeros((h, w), dtype=bool)
    # Anti-aliased edges are blends p = α·c + (1-α)·b; measure the distance from each pixel to that segment.
    c_rgb, b_rgb = _PALETTE[_COLOUR_INDEX[colour]], _PALETTE[_COLOUR_INDEX[background]]
    seg = c_rgb - b_rgb
    alpha = np.clip(((image - b_rgb) @ seg) / float(seg @ seg), 0.0, 1.0)  # (H, W)
    off_segment = np.linalg.norm(image - (b_rgb + alpha[..., None] * seg), axis=-1)  # (H, W)
    edge = ~fg & ~bg_mask & (off_segment < EDGE_TOLERANCE)
    area, bg_area, edge_area = int(fg.sum()), int(bg_mask.sum()), int(edge.sum())

    background_term = bg_area / (n - area) if n > area else 0.0
    colour_term = (area / (n - bg_area - edge_area) if n > bg_area + edge_area else 0.0) * min(1.0, area / MIN_SHAPE_AREA)
    if area:
        ys, xs = np.nonzero(fg)
        box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
        ious = np.array([_iou(fg, shape_template(k, box, (h, w))) for k in SHAPES])
        logits = SHAPE_TEMPERATURE * ious
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        shape_term = float(probs[SHAPES.index(shape)])
        shape_ok = int(ious.argmax()) == SHAPES.index(shape)
        half_size = ((box[2] - box[0]) + (box[3] - box[1])) / 4
    else:
        shape_term, shape_ok, half_size = 0.0, False, 0.0

    taste = float(np.clip((half_size - MIN_HALF_SIZE) / (MAX_HALF_SIZE - MIN_HALF_SIZE), 0.0, 1.0))
    caption_term = (background_term + colour_term + shape_term) / 3
    match = background_term >= BACKGROUND_OK and colour_term >= COLOUR_OK and shape_ok
    return {
        "background": background_term,
        "colour": colour_term,
        "shape": shape_term,
        "caption": caption_term,
        "half_size": half_size,
        "taste": taste,
        "match": float(match),
        "reward": caption_term + taste_weight * taste,
    }


def oracle_terms(images, captions: Sequence[str], *, taste_weight: float = 1.0) -> dict[str, np.ndarray]:
    """Every oracle term for a batch, each a float64 array of shape (N,); keys are :data:`TERMS`.

    ``images``: list of PIL images, float (N, 3, H, W) in [0, 1] (tensor or array) or uint8 (N, H, W, 3).
    ``captions``: N toy captions (see :func:`diffalign.toy.shapes.make_caption`).
    """
    arr = as_numpy_images(images)
    if len(arr) != len(captions):
        raise ValueError(f"got {len(arr)} images for {len(captions)} captions")
    rows = [_terms_one(im, cap, taste_weight) for im, cap in zip(arr, captions)]
    return {k: np.array([r[k] for r in rows], dtype=np.float64) for k in TERMS}


def oracle_reward(images, captions: Sequence[str], *, taste_weight: float = 1.0) -> np.ndarray:
    """``caption + taste_weight · taste`` per image, float64 (N,), range [0, 1 + taste_weight]. See module doc."""
    return oracle_terms(images, captions, taste_weight=taste_weight)["reward"]


def caption_match(images, captions: Sequence[str]) -> np.ndarray:
    """1.0 where the image shows its caption (right background, shape colour and shape class), else 0.0; (N,)."""
    return oracle_terms(images, captions)["match"]
