"""Procedural captioned images: one coloured shape on a coloured background, 32x32 RGB.

A caption names three attributes, ``"a {colour} {shape} on a {background} background"``. The shape's size and position
are not in the caption: they are drawn uniformly, so a model trained on this data produces a spread of sizes, and the
oracle's taste term (bigger is better, see :mod:`diffalign.toy.oracle`) is something pretraining does not already
satisfy.

Prompts are split once, by hand, into TRAIN and HELD-OUT combinations (:data:`HELDOUT_COMBOS`). Every pair of
attributes in a held-out prompt (colour-shape, shape-background, colour-background) also occurs in training prompts,
so a model that composes attributes can draw a held-out prompt it has never seen.

Geometry (pixel units, origin at the top-left corner, continuous coordinates): a shape of half-extent ``s`` and
elongation ``α`` centred at ``(cx, cy)`` fills the box ``[cx - w, cx + w] x [cy - h, cy + h]`` with
``w = s·e^{α/2}``, ``h = s·e^{-α/2}`` (``α > 0``: wide, ``α < 0``: tall; the box area ``4wh = 4s²`` does not depend on
``α``). By default ``α = 0`` (squares, circles, isosceles triangles as tall as wide); ``aspect_jitter = A`` draws
``α ~ U[-A, A]``. The fill is the caption's colour ``c`` shaded by ``λ``: ``c + λ(255 - c)`` (lighter) for
``λ > 0``, ``(1 + λ) c`` (darker) for ``λ < 0``; by default ``λ = 0``, and ``shade_jitter = L`` draws
``λ ~ U[-L, L]``. The background's colour ``b`` is shaded the same way by ``μ``, by default 0;
``background_jitter = M`` draws ``μ ~ U[-M, M]``. Last, a colour cast ``τ`` blends both colours toward warm
``(255, 128, 0)`` (``τ > 0``) or cold ``(0, 128, 255)`` (``τ < 0``) by ``|τ|``; by default 0, ``cast_jitter = T``
draws ``τ ~ U[-T, T]`` (at ``T = 0.2`` with both shades at 0.3, about 4 % of the fills are nearer another palette
colour than their own). These are free attributes beside size that, unlike position, a translation-equivariant U-Net
could change; the PPD toy world (:mod:`diffalign.personalization.toy`) uses the shades and the cast:

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
# Largest elongation jitter A: w = 12·e^{A/2} must fit in half the canvas (16 px).
MAX_ASPECT_JITTER = 2 * float(np.log(IMAGE_SIZE / 2 / MAX_HALF_SIZE))
# Largest shade jitter L: at 0.3 every shaded palette colour is still nearest to its own name (the oracle's test).
MAX_SHADE_JITTER = 0.3
# Colour cast (module doc): the warm and cold colours (equally light) and the largest cast jitter T.
WARM, COLD = (255, 128, 0), (0, 128, 255)
MAX_CAST_JITTER = 0.3

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
    """One image: what the caption says plus the free attributes (size, position in pixels; elongation ``aspect`` =
    α and ``shade`` = λ of the module doc, 0 unless jittered)."""

    colour: str
    shape: str
    background: str
    half_size: float
    cx: float
    cy: float
    aspect: float = 0.0
    shade: float = 0.0
    background_shade: float = 0.0
    cast: float = 0.0

    @property
    def caption(self) -> str:
        return make_caption(self.colour, self.shape, self.background)

    @property
    def fill(self) -> tuple[int, int, int]:
        """The shape's RGB: the caption's colour shaded by λ, then cast by τ (module doc)."""
        return cast_colour(shade_colour(COLOURS[self.colour], self.shade), self.cast)

    @property
    def background_fill(self) -> tuple[int, int, int]:
        """The background's RGB: the caption's background colour shaded by μ, then cast by τ (module doc)."""
        return cast_colour(shade_colour(COLOURS[self.background], self.background_shade), self.cast)

    @property
    def half_extents(self) -> tuple[float, float]:
        """``(w, h)``: half-width and half-height in pixels."""
        return self.half_size * float(np.exp(self.aspect / 2)), self.half_size * float(np.exp(-self.aspect / 2))


def shade_colour(rgb: tuple[int, int, int], shade: float) -> tuple[int, int, int]:
    """``c + shade·(255 - c)`` (lighter) for ``shade > 0``, ``(1 + shade)·c`` (darker) otherwise; rounded."""
    c = np.array(rgb, dtype=np.float64)
    shaded = c + shade * (255.0 - c) if shade > 0 else (1.0 + shade) * c
    return tuple(int(v) for v in np.round(shaded))


def cast_colour(rgb: tuple[int, int, int], cast: float) -> tuple[int, int, int]:
    """``(1 - |τ|)·c + |τ|·warm`` for ``τ > 0``, ``... cold`` for ``τ < 0`` (:data:`WARM`, :data:`COLD`); rounded."""
    if not cast:
        return tuple(rgb)
    target = np.array(WARM if cast > 0 else COLD, dtype=np.float64)
    mixed = (1.0 - abs(cast)) * np.array(rgb, dtype=np.float64) + abs(cast) * target
    return tuple(int(v) for v in np.round(mixed))


def random_spec(rng: np.random.Generator, caption: str, aspect_jitter: float = 0.0,
                shade_jitter: float = 0.0, background_jitter: float = 0.0, cast_jitter: float = 0.0) -> ShapeSpec:
    """Draw ``half_size ~ U[6, 12]`` px, with ``aspect_jitter`` A > 0 an elongation ``α ~ U[-A, A]``, and a centre
    that keeps the whole shape inside the canvas; then, with ``shade_jitter`` L > 0, a shade ``λ ~ U[-L, L]``; then,
    with ``background_jitter`` M > 0, a background shade ``μ ~ U[-M, M]``; then, with ``cast_jitter`` T > 0, a colour
    cast ``τ ~ U[-T, T]``. ``A = L = M = T = 0`` draws exactly what it always drew (same random stream)."""
    colour, shape, background = parse_caption(caption)
    if not 0.0 <= aspect_jitter <= MAX_ASPECT_JITTER:
        raise ValueError(f"aspect_jitter must be in [0, {MAX_ASPECT_JITTER:.3f}] (the shape must fit), "
                         f"got {aspect_jitter}")
    if not 0.0 <= shade_jitter <= MAX_SHADE_JITTER:
        raise ValueError(f"shade_jitter must be in [0, {MAX_SHADE_JITTER}] (colours must keep their names), "
                         f"got {shade_jitter}")
    if not 0.0 <= background_jitter <= MAX_SHADE_JITTER:
        raise ValueError(f"background_jitter must be in [0, {MAX_SHADE_JITTER}] (colours must keep their names), "
                         f"got {background_jitter}")
    if not 0.0 <= cast_jitter <= MAX_CAST_JITTER:
        raise ValueError(f"cast_jitter must be in [0, {MAX_CAST_JITTER}], got {cast_jitter}")
    s = float(rng.uniform(MIN_HALF_SIZE, MAX_HALF_SIZE))
    if not aspect_jitter:
        alpha = 0.0
        cx, cy = (float(v) for v in rng.uniform(s, IMAGE_SIZE - s, size=2))
    else:
        alpha = float(rng.uniform(-aspect_jitter, aspect_jitter))
        w, h = s * float(np.exp(alpha / 2)), s * float(np.exp(-alpha / 2))
        cx, cy = float(rng.uniform(w, IMAGE_SIZE - w)), float(rng.uniform(h, IMAGE_SIZE - h))
    shade = float(rng.uniform(-shade_jitter, shade_jitter)) if shade_jitter else 0.0
    mu = float(rng.uniform(-background_jitter, background_jitter)) if background_jitter else 0.0
    tau = float(rng.uniform(-cast_jitter, cast_jitter)) if cast_jitter else 0.0
    return ShapeSpec(colour, shape, background, s, cx, cy, alpha, shade, mu, tau)


def render(spec: ShapeSpec, *, supersample: int = 4) -> Image.Image:
    """Draw ``spec`` at ``supersample`` x resolution and box-filter down to 32x32 (anti-aliased edges)."""
    k = supersample
    big = Image.new("RGB", (IMAGE_SIZE * k, IMAGE_SIZE * k), spec.background_fill)
    draw = ImageDraw.Draw(big)
    fill = spec.fill
    half_w, half_h = spec.half_extents
    cx, cy, w, h = spec.cx * k, spec.cy * k, half_w * k, half_h * k
    if spec.shape == "circle":
        draw.ellipse([cx - w, cy - h, cx + w, cy + h], fill=fill)
    elif spec.shape == "square":
        draw.rectangle([cx - w, cy - h, cx + w, cy + h], fill=fill)
    elif spec.shape == "triangle":
        draw.polygon([(cx, cy - h), (cx - w, cy + h), (cx + w, cy + h)], fill=fill)
    else:
        raise ValueError(f"shape must be one of {SHAPES}, got {spec.shape!r}")
    return big.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX)


def render_batch(captions: list[str], seed: int, aspect_jitter: float = 0.0, shade_jitter: float = 0.0,
                 background_jitter: float = 0.0, cast_jitter: float = 0.0) -> tuple[np.ndarray, list[ShapeSpec]]:
    """Render one random image per caption (elongation, shade, background-shade and cast jitter: :func:`random_spec`).
    Deterministic in ``seed`` (numpy PCG64).

    Returns ``images`` uint8 of shape (N, 32, 32, 3) and the specs that made them.
    """
    rng = np.random.default_rng(seed)
    specs = [random_spec(rng, c, aspect_jitter, shade_jitter, background_jitter, cast_jitter) for c in captions]
    images = np.stack([np.asarray(render(spec)) for spec in specs])  # (N, H, W, 3)
    return images, specs


def sample_captions(n: int, seed: int, prompts: list[str] | None = None) -> list[str]:
    """``n`` captions drawn uniformly from ``prompts`` (default: :func:`train_prompts`), balanced by cycling."""
    prompts = train_prompts() if prompts is None else prompts
    rng = np.random.default_rng(seed)
    reps = -(-n // len(prompts))
    order = np.concatenate([rng.permutation(len(prompts)) for _ in range(reps)])[:n]
    return [prompts[i] for i in order]
