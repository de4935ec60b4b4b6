"""Procedural captioned images: one coloured shape on a coloured background, 32x32 RGB.

A caption names three attributes, ``"a {colour} {shape} on a {background} background"``. The shape's size and position
are not in the caption: they are drawn uniformly, so a model trained on this data produces a spread of sizes, and the
oracle's taste term (bigger is better, see :mod:`diffalign.toy.oracle`) is something pretraining does not already
satisfy.

Prompts are split once, by hand, into TRAIN and HELD-OUT combinations (:data:`HELDOUT_COMBOS`). Every pair of
attributes in a held-out prompt (colour-shape, shape-background, colour-background) also occurs in training prompts,
so a model that composes attributes can draw a held-out prompt it has never seen.

Geometry (pixel units, origin at the top-left corner, continuous coordinates): a shape of half-extent ``s`` centred at
``(cx, cy)`` fills the box ``[cx - s, cx + s] x [cy - s, cy + s]``:

==========  ===================================================  ==========================
shape       region                                               area / box area
==========  ===================================================  ==========================
circle      ``(x - cx)² + (y - cy)² <= s²``                      π/4 ≈ 0.785
square      the whole box                                        1
triangle    apex ``(cx, cy - s)``, base ``(cx ± s, cy + s)``     1/2
==========  ===================================================  ==========================
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import permutations

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 32
# Palette (sRGB, 0-255). Six colours pairwise >= 110 apart in RGB (blue-purple is the closest pair), so nearest-colour segmentation is unambiguous.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 50, 180),
    "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle")
# Half-extent s in pixels, drawn uniformly: diameters 12-24 px on a 32 px canvas. Below s = 6 an 8x8 latent (a
# shape spans 3 latent pixels) cannot keep a triangle apart from a blob, so the toy VAE would fail the oracle.
MIN_HALF_SIZE = 6.0
MAX_HALF_SIZE = 12.0

CAPTION_TEMPLATE = "a {colour} {shape} on a {background} background"
_CAPTION_RE = re.compile(r"^a (\w+) (\w+) on a (\w+) background$")

# (colour, shape, background) combinations never seen in pretraining or preference pairs: 12 of 90 (13 %). Chosen so
# that no two of them share a (colour, shape), (shape, background) or (colour, background) pair; each such pair
# therefore keeps all but one of its training combinations (tests/toy/test_shapes.py checks this).
HELDOUT_COMBOS: tuple[tuple[str, str, str], ...] = (
    ("red", "circle", "blue"),
    ("red", "square", "yellow"),
    ("red", "triangle", "white"),
    ("green", "circle", "purple"),
    ("green", "square", "white"),
    ("green", "triangle", "red"),
    ("blue", "circle", "yellow"),
    ("blue", "square", "green"),
    ("yellow", "triangle", "blue"),
    ("purple", "circle", "red"),
    ("purple", "triangle", "green"),
    ("white", "square", "purple"),
)


def make_caption(colour: str, shape: str, background: str) -> str:
    """``"a {colour} {shape} on a {background} background"``."""
    return CAPTION_TEMPLATE.format(colour=colour, shape=shape, background=background)


def parse_caption(caption: str) -> tuple[str, str, str]:
    """Inverse of :func:`make_caption`: ``(colour, shape, background)``. Raises ``ValueError`` on anything else."""
    m = _CAPTION_RE.match(caption.strip().lower())
    if m is None or m.group(1) not in COLOURS or m.group(2) not in SHAPES or m.group(3) not in COLOURS:
        raise ValueError(
            f"not a toy caption: {caption!r}; expected {CAPTION_TEMPLATE!r} with colours {sorted(COLOURS)} "
            f"and shapes {list(SHAPES)}"
        )
    return m.group(1), m.group(2), m.group(3)


def all_combos() -> list[tuple[str, str, str]]:
    """All 90 ``(colour, shape, background)`` with ``colour != background``, in a fixed order."""
    return [(c, s, b) for c, b in permutations(COLOURS, 2) for s in SHAPES]


def train_prompts() -> list[str]:
    """The 78 training captions (fixed order)."""
    held = set(HELDOUT_COMBOS)
    return [make_caption(*combo) for combo in all_combos() if combo not in held]


def heldout_prompts() -> list[str]:
    """The 12 held-out captions (fixed order); disjoint from :func:`train_prompts`."""
    return [make_caption(*combo) for combo in HELDOUT_COMBOS]


@dataclass(frozen=True)
class ShapeSpec:
    """One image: what the caption says plus the free attributes (size and position, in pixels)."""

    colour: str
    shape: str
    background: str
    half_size: float
    cx: float
    cy: float

    @property
    def caption(self) -> str:
        return make_caption(self.colour, self.shape, self.background)


def random_spec(rng: np.random.Generator, caption: str) -> ShapeSpec:
    """Draw ``half_size ~ U[6, 12]`` px and a centre that keeps the whole shape inside the canvas."""
    colour, shape, background = parse_caption(caption)
    s = float(rng.uniform(MIN_HALF_SIZE, MAX_HALF_SIZE))
    cx, cy = (float(v) for v in rng.uniform(s, IMAGE_SIZE - s, size=2))
    return ShapeSpec(colour, shape, background, s, cx, cy)


def render(spec: ShapeSpec, *, supersample: int = 4) -> Image.Image:
    """Draw ``spec`` at ``supersample`` x resolution and box-filter down to 32x32 (anti-aliased edges)."""
    k = supersample
    big = Image.new("RGB", (IMAGE_SIZE * k, IMAGE_SIZE * k), COLOURS[spec.background])
    draw = ImageDraw.Draw(big)
    fill = COLOURS[spec.colour]
    cx, cy, s = spec.cx * k, spec.cy * k, spec.half_size * k
    if spec.shape == "circle":
        draw.ellipse([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif spec.shape == "square":
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif spec.shape == "triangle":
        draw.polygon([(cx, cy - s), (cx - s, cy + s), (cx + s, cy + s)], fill=fill)
    else:
        raise ValueError(f"shape must be one of {SHAPES}, got {spec.shape!r}")
    return big.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX)


def render_batch(captions: list[str], seed: int) -> tuple[np.ndarray, list[ShapeSpec]]:
    """Render one random image per caption. Deterministic in ``seed`` (numpy PCG64).

    Returns ``images`` uint8 of shape (N, 32, 32, 3) and the specs that made them.
    """
    rng = np.random.default_rng(seed)
    specs = [random_spec(rng, c) for c in captions]
    images = np.stack([np.asarray(render(spec)) for spec in specs])  # (N, H, W, 3)
    return images, specs


def sample_captions(n: int, seed: int, prompts: list[str] | None = None) -> list[str]:
    """``n`` captions drawn uniformly from ``prompts`` (default: :func:`train_prompts`), balanced by cycling."""
    prompts = train_prompts() if prompts is None else prompts
    rng = np.random.default_rng(seed)
    reps = -(-n // len(prompts))
    order = np.concatenate([rng.permutation(len(prompts)) for _ in range(reps)])[:n]
    return [prompts[i] for i in order]
