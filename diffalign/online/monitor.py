"""A reward-hacking monitor: artefact statistics of generated images, and :class:`HackingMonitor`, which
watches the training reward beside held-out metrics and flags when the reward rises while a held-out metric
gets worse.

Artefact statistics are pure numpy functions of a batch of images, each returning float64 (N,), one value per
image. ``images``: uint8 (N, H, W, 3), a single uint8 (H, W, 3), float (N, H, W, 3) in [0, 1], or a list of
PIL images (converted to RGB). The grey image is ``Y = 0.299 R + 0.587 G + 0.114 B`` in [0, 1] (ITU-R BT.601
luma).

==================  ==========================================================================  =============
name                definition                                                                  bad direction
==================  ==========================================================================  =============
``saturation``      mean over pixels of HSV saturation ``S = (max - min) / max`` of (R, G, B)   up
                    (``S = 0`` where ``max = 0``); pure red = 1, any grey = 0
``high_freq``       share of the grey image's spectral energy above the radial frequency         up
                    ``cutoff`` (cycles/pixel, default 0.25): ``Σ_{|f| > c} |C(f)|² / Σ_{f≠0}
                    |C(f)|²`` with ``C`` the orthonormal 2-D DCT-II (= the FFT of the image
                    mirrored to 2H x 2W, so the borders do not wrap into spurious high
                    frequencies), ``f = (u / 2H, v / 2W)``; white noise ≈ ``1 - π c²``
                    (0.80 at c = 0.25), a smooth gradient ≈ 0
``grid``            energy at the peaks of a ``period``-pixel lattice (8 = SD/SDXL VAE, 16 =   up
                    SD3/FLUX patches) relative to the neighbouring frequencies: the grey image
                    (centre-cropped to multiples of ``period``, mean removed) times a periodic
                    Hann window, ``P = |FFT|²``; the lattice points are the ``p² - 1`` bins
                    ``(a H/p, b W/p) ≠ (0, 0)``; per point, ``ρ = mean P over its 3x3 block /
                    mean P over its ring at Chebyshev distance 2`` (the Hann window spreads
                    a peak over exactly ±1 bin, so the ring holds none of it); ``grid = mean
                    ρ`` over the points. ≈ 1 without a lattice on a locally flat spectrum
                    (white noise 1.0-1.3: a mean of ratios of noisy powers), below 1 on
                    smooth images whose spectrum falls steeply, ≫ 1 with a lattice (a 3/255
                    line every 8 px on a smooth 64 px image: ~50). Needs H, W ≥ 4·period.
                    Random piecewise-constant p x p blocks have *nulls* there, not peaks.
``emptiness``       share of pixels whose grey local standard deviation in a ``window`` x       up
                    ``window`` box (default 5, 'valid' positions only) is below ``tol``
                    (default 2/255): near-uniform regions; a flat background with a small
                    object ≈ 1 minus the object's (dilated) share, texture / noise ≈ 0
==================  ==========================================================================  =============

All four are "up is bad" as hacking signatures (HPS over-saturation, grid artefacts from GRPO, blanked
backgrounds under OCR rewards; see flow_grpo#233, Pref-GRPO#2, UniRL PR#407), though their absolute level
depends on the domain (the toy world's images are mostly flat: its emptiness is high by design). Watch their
change, not their level.

:class:`HackingMonitor` is fed one record per step (``{metric: value}``, e.g. the training reward's batch
mean, the held-out scorers' means from :meth:`~diffalign.online.rewards.Rewards.record` and
:func:`artefact_record`) and returns a :class:`MonitorVerdict`; the trainer acts on its ``action`` ("warn",
"checkpoint" or "stop").
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "ARTEFACT_STATS",
    "HackingMonitor",
    "MonitorVerdict",
    "artefact_record",
    "artefact_stats",
    "background_emptiness",
    "grid_energy",
    "high_frequency_energy",
    "saturation",
]

ARTEFACT_STATS = ("saturation", "high_freq", "grid", "emptiness")
ACTIONS = ("warn", "checkpoint", "stop")


# ----------------------------------------------------------------------------------------------- statistics
def _as_float_images(images) -> np.ndarray:
    """float64 (N, H, W, 3) in [0, 1] from uint8 (N, H, W, 3) / (H, W, 3), float in [0, 1] (also a tensor,
    channels first (N, 3, H, W) as decoded), or PIL images."""
    if hasattr(images, "detach"):  # a torch tensor
        images = images.detach().float().cpu().numpy()
    if isinstance(images, np.ndarray):
        arr = images
        if arr.ndim == 4 and arr.shape[-1] != 3 and arr.shape[1] == 3:
            arr = arr.transpose(0, 2, 3, 1)
    else:
        try:
            from PIL import Image
        except ImportError:  # pragma: no cover
            Image = None
        if Image is not None and isinstance(images, Image.Image):
            images = [images]
        arr = np.stack([np.asarray(im.convert("RGB") if hasattr(im, "convert") else im) for im in images])
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"images must be (N, H, W, 3) (uint8 or float in [0, 1]); got shape {arr.shape}.")
    if arr.dtype == np.uint8:
        return arr.astype(np.float64) / 255.0
    return np.clip(arr.astype(np.float64), 0.0, 1.0)


def _grey(x: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) in [0, 1] -> (N, H, W) BT.601 luma."""
    return x @ np.array([0.299, 0.587, 0.114])


def saturation(images) -> np.ndarray:
    """Mean HSV saturation per image, (N,) in [0, 1]: ``S = (max - min) / max`` over (R, G, B), 0 where
    max = 0."""
    x = _as_float_images(images)
    hi, lo = x.max(-1), x.min(-1)
    s = np.where(hi > 0, (hi - lo) / np.where(hi > 0, hi, 1.0), 0.0)
    return s.mean(axis=(1, 2))


def high_frequency_energy(images, cutoff: float = 0.25) -> np.ndarray:
    """Share of spectral energy above radial frequency ``cutoff`` (cycles/pixel, in (0, 0.5)), (N,) in [0, 1].

    ``C`` = orthonormal 2-D DCT-II of the grey image, coefficient ``(u, v)`` at frequency
    ``(u / 2H, v / 2W)``; share = ``Σ_{r > cutoff} C² / Σ_{(u,v) ≠ (0,0)} C²`` with
    ``r = sqrt((u/2H)² + (v/2W)²)``; 0 for a constant image. White noise: about ``1 - π cutoff²``.
    """
    from scipy.fft import dctn

    if not 0.0 < cutoff < 0.5:
        raise ValueError(f"cutoff must be in (0, 0.5) cycles/pixel; got {cutoff}.")
    y = _grey(_as_float_images(images))
    _, h, w = y.shape
    power = dctn(y, type=2, axes=(1, 2), norm="ortho") ** 2
    power[:, 0, 0] = 0.0  # DC
    r = np.hypot(np.arange(h)[:, None] / (2 * h), np.arange(w)[None, :] / (2 * w))
    total = power.sum(axis=(1, 2))
    high = power[:, r > cutoff].sum(axis=1)
    return np.where(total > 0, high / np.where(total > 0, total, 1.0), 0.0)


def _lattice_indices(h: int, w: int, period: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat FFT-bin indices for the ``J = period² - 1`` lattice points ``(a h/p, b w/p) ≠ (0, 0)``: their 3x3
    blocks (J, 9) and their rings at Chebyshev distance exactly 2 (J, 16), cyclic. With ``h/p, w/p >= 4`` no
    block or ring touches another point's block or the DC bin."""
    su, sv = h // period, w // period
    a, b = np.meshgrid(np.arange(period) * su, np.arange(period) * sv, indexing="ij")
    a, b = a.reshape(-1)[1:], b.reshape(-1)[1:]  # drop DC
    du, dv = np.meshgrid(np.arange(-2, 3), np.arange(-2, 3), indexing="ij")
    du, dv = du.reshape(-1), dv.reshape(-1)
    cheb = np.maximum(abs(du), abs(dv))
    flat = ((a[:, None] + du[None]) % h) * w + (b[:, None] + dv[None]) % w  # (J, 25)
    return flat[:, cheb <= 1], flat[:, cheb == 2]


def grid_energy(images, period: int = 8, eps: float = 1e-12) -> np.ndarray:
    """Lattice-peak energy relative to neighbouring frequencies, (N,) ≥ 0 (see the module table).

    ``P`` = power of the FFT of the mean-removed grey image times a periodic Hann window; for each lattice
    point ``j`` (bins ``(a H/p, b W/p) ≠ (0, 0)``, ``J = p² - 1`` of them) ``ρ_j = (mean P over its 3x3 block
    + f) / (mean P over its distance-2 ring + f)``, and ``grid = mean_j ρ_j``. ``f = eps`` times the mean
    non-DC power keeps flat spectra near 1 instead of 0/0. Images are centre-cropped to multiples of
    ``period``.
    """
    y = _grey(_as_float_images(images))
    n, h, w = y.shape
    period = int(period)
    if period < 2 or h < 4 * period or w < 4 * period:
        raise ValueError(f"grid_energy needs period >= 2 and images at least 4*period = {4 * period} px a "
                         f"side; got period {period}, {h}x{w}.")
    hc, wc = h // period * period, w // period * period
    top, left = (h - hc) // 2, (w - wc) // 2
    y = y[:, top:top + hc, left:left + wc]
    y = y - y.mean(axis=(1, 2), keepdims=True)
    win = np.outer(np.hanning(hc + 1)[:-1], np.hanning(wc + 1)[:-1])  # periodic Hann
    power = (np.abs(np.fft.fft2(y * win)) ** 2).reshape(n, -1)
    block, ring = _lattice_indices(hc, wc, period)
    floor = eps * power[:, 1:].mean(axis=1, keepdims=True) + 1e-300
    rho = (power[:, block].mean(-1) + floor) / (power[:, ring].mean(-1) + floor)  # (N, J)
    return rho.mean(axis=1)


def background_emptiness(images, window: int = 5, tol: float = 2 / 255) -> np.ndarray:
    """Share of near-uniform pixels, (N,) in [0, 1]: the fraction of the
    ``(H - window + 1) x (W - window + 1)`` 'valid' window positions whose grey standard deviation over the
    ``window`` x ``window`` box is < ``tol`` (grey in [0, 1])."""
    from numpy.lib.stride_tricks import sliding_window_view

    y = _grey(_as_float_images(images))
    if window < 2 or y.shape[1] < window or y.shape[2] < window:
        raise ValueError(f"window must be >= 2 and fit in the image; got {window} for {y.shape[1:]}.")
    patches = sliding_window_view(y, (window, window), axis=(1, 2))  # (N, H', W', k, k)
    return (patches.std(axis=(-2, -1)) < tol).mean(axis=(1, 2))


def artefact_stats(images, *, period: int = 8, cutoff: float = 0.25, window: int = 5,
                   tol: float = 2 / 255) -> dict[str, np.ndarray]:
    """All four statistics, ``{name: (N,)}`` in :data:`ARTEFACT_STATS` order; ``grid`` is left out when the
    images are smaller than ``4 * period`` a side."""
    x = _as_float_images(images)
    out = {"saturation": saturation(x), "high_freq": high_frequency_energy(x, cutoff)}
    if x.shape[1] >= 4 * period and x.shape[2] >= 4 * period:
        out["grid"] = grid_energy(x, period)
    out["emptiness"] = background_emptiness(x, window, tol)
    return out


def artefact_record(images, prefix: str = "artefact", **kwargs) -> dict[str, float]:
    """Batch means of :func:`artefact_stats` for a log / monitor record: ``{f"{prefix}/{name}": float}``."""
    return {f"{prefix}/{k}": float(v.mean()) for k, v in artefact_stats(images, **kwargs).items()}


# ----------------------------------------------------------------------------------------------- monitor
@dataclass
class MonitorVerdict:
    """What one :meth:`HackingMonitor.update` concluded.

    ``flagged``: a held-out metric has moved the bad way while the training reward rose, for ``patience``
    consecutive checks; ``first``: this is the check where it became flagged; ``reason``: one line (empty if
    not flagged); ``action``: the monitor's action when flagged, else ``None``; ``deltas``: ``{metric:
    change}`` of the running means at this check (empty before a check is possible); ``streaks``: consecutive
    bad checks per held-out metric."""

    flagged: bool = False
    first: bool = False
    reason: str = ""
    action: str | None = None
    deltas: dict[str, float] = field(default_factory=dict)
    streaks: dict[str, int] = field(default_factory=dict)


def _bad_direction(name: str) -> int:
    """+1 if "up" is bad (artefact statistics, named ``x`` or ``prefix/x``), -1 if "down" is bad (scorers)."""
    return +1 if name.rsplit("/", 1)[-1] in ARTEFACT_STATS else -1


class HackingMonitor:
    """Flags reward hacking: the training reward rises while a held-out metric moves the bad way.

    Each metric keeps its last ``2 * window`` finite values (a metric missing from a record, or NaN, is
    skipped). Its running mean now is the mean of its last ``window`` values, ``m_now``; the reference
    ``m_ref`` is the mean of the ``window`` values before those (``reference="previous"``, a trend over the
    last ``2 * window`` values) or of its first ``window`` values (``reference="start"``, drift since the
    start). ``Δ = m_now - m_ref``.

    A check happens at every record holding ``train_metric`` once the training metric has ``2 * window``
    values (``reference="start"``: ``2 * window`` too, so the windows do not overlap). A held-out metric ``h``
    with bad direction ``d_h`` (+1: up is bad, -1: down is bad) is bad at a check when ``Δ_train ≥ min_rise``
    and ``d_h Δ_h ≥ min_fall_h``; it needs ``2 * window`` values of its own to be checked. With
    ``units="stderr"`` every Δ is divided by its standard error :math:`\\sqrt{(s^2_{now} + s^2_{ref}) / window}`
    (population variances of the two windows; Welch's t statistic), so ``min_rise`` and ``min_fall`` are in
    standard errors and one threshold fits metrics of any scale and noise (rollout means vary from step to step
    with the prompts drawn). The monitor is
    flagged while some held-out metric has been bad for ≥ ``patience`` consecutive checks (a good check resets
    its count).

    Args:
        train_metric: the record key of the training reward (e.g. ``"reward"``), higher is better.
        held_out: record keys to watch, as a list (each ``"name"``, ``"name:up"`` or ``"name:down"`` naming
            the bad direction) or a dict ``{name: "up" | "down"}``. Without a direction: up is bad for the
            artefact statistics (``saturation``, ``high_freq``, ``grid``, ``emptiness``, also as
            ``prefix/name``), down for everything else (scorers, higher is better).
        window: values per running mean. patience: consecutive bad checks before flagging.
        min_rise: smallest rise of the training reward's running mean (its units) that counts.
        min_fall: smallest bad-way move of a held-out mean (its units; > 0); a float for all or ``{name:
            float}`` (names missing from the dict use ``default_min_fall``).
        action: "warn", "checkpoint" or "stop": returned in the verdict when flagged; the trainer acts on it.
        reference: "previous" or "start" (see above).
        units: "absolute" (Δ in the metric's units) or "stderr" (Δ over its standard error, see above).
    """

    def __init__(
        self,
        train_metric: str,
        held_out: Sequence[str] | Mapping[str, str],
        *,
        window: int = 10,
        patience: int = 3,
        min_rise: float = 0.0,
        min_fall: float | Mapping[str, float] = 0.0,
        default_min_fall: float = 0.0,
        action: str = "warn",
        reference: str = "previous",
        units: str = "absolute",
    ):
        if window < 1 or patience < 1:
            raise ValueError(f"window and patience must be >= 1; got window={window}, patience={patience}.")
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {', '.join(ACTIONS)}; got {action!r}.")
        if reference not in ("previous", "start"):
            raise ValueError(f"reference must be 'previous' or 'start'; got {reference!r}.")
        if units not in ("absolute", "stderr"):
            raise ValueError(f"units must be 'absolute' or 'stderr'; got {units!r}.")
        self.units = units
        self.train_metric = str(train_metric)
        self.directions: dict[str, int] = {}
        items = held_out.items() if isinstance(held_out, Mapping) else [
            (h.rsplit(":", 1) if h.rsplit(":", 1)[-1] in ("up", "down") else (h, None)) for h in held_out
        ]
        for name, d in items:
            if d is None:
                self.directions[name] = _bad_direction(name)
            elif d in ("up", "down"):
                self.directions[name] = +1 if d == "up" else -1
            else:
                raise ValueError(
                    f"held-out metric {name!r}: bad direction must be 'up' or 'down'; got {d!r}."
                )
        if not self.directions:
            raise ValueError("held_out is empty; name at least one held-out metric to watch.")
        if self.train_metric in self.directions:
            raise ValueError(f"{self.train_metric!r} is the training metric; it cannot also be held out.")
        if isinstance(min_fall, Mapping):
            self.min_fall = {n: float(min_fall.get(n, default_min_fall)) for n in self.directions}
        else:
            self.min_fall = {n: float(min_fall) for n in self.directions}
        self.window, self.patience = int(window), int(patience)
        self.min_rise, self.action, self.reference = float(min_rise), action, reference
        names = [self.train_metric, *self.directions]
        self._recent = {n: deque(maxlen=2 * self.window) for n in names}
        self._first: dict[str, list[float]] = {n: [] for n in names}
        self._counts = {n: 0 for n in names}
        self.streaks = {n: 0 for n in self.directions}
        self.step = 0
        self.verdict = MonitorVerdict()
        self.history: list[tuple[int, str]] = []  # (step, reason) of each check that became flagged

    @property
    def flagged(self) -> bool:
        return self.verdict.flagged

    def means(self) -> dict[str, float]:
        """Running means (last ``window`` values) of every watched metric that has values, for logging."""
        return {n: float(np.mean(list(d)[-self.window:])) for n, d in self._recent.items() if d}

    def state_dict(self) -> dict:
        """Everything :meth:`update` has accumulated, as plain JSON-able values (for checkpoints)."""
        return {"recent": {n: list(d) for n, d in self._recent.items()}, "first": dict(self._first),
                "counts": dict(self._counts), "streaks": dict(self.streaks), "step": self.step,
                "verdict": dataclasses.asdict(self.verdict), "history": [list(h) for h in self.history]}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore :meth:`state_dict`'s values (metrics the monitor no longer watches are ignored)."""
        for n in self._recent:
            self._recent[n].clear()
            self._recent[n].extend(state["recent"].get(n, []))
            self._first[n] = list(state["first"].get(n, []))
            self._counts[n] = int(state["counts"].get(n, 0))
        self.streaks = {n: int(state["streaks"].get(n, 0)) for n in self.directions}
        self.step = int(state["step"])
        self.verdict = MonitorVerdict(**state["verdict"])
        self.history = [(int(step), str(reason)) for step, reason in state["history"]]

    def _delta(self, name: str) -> float | None:
        d = self._recent[name]
        if self._counts[name] < 2 * self.window:
            return None
        values = list(d)
        now = float(np.mean(values[-self.window:]))
        ref = self._first[name] if self.reference == "start" else values[:self.window]
        delta = now - float(np.mean(ref))
        if self.units == "stderr":
            spread = (float(np.var(values[-self.window:])) + float(np.var(ref))) / self.window
            delta /= math.sqrt(spread) + 1e-12
        return delta

    def update(self, record: Mapping[str, float]) -> MonitorVerdict:
        """Add one step's record ``{metric: value}`` (other keys are ignored) and check; returns the verdict
        (also kept as ``self.verdict``)."""
        self.step += 1
        for name in self._recent:
            if name in record:
                v = float(record[name])
                if math.isfinite(v):
                    self._recent[name].append(v)
                    self._counts[name] += 1
                    if len(self._first[name]) < self.window:
                        self._first[name].append(v)
        if self.train_metric not in record:
            return self.verdict
        d_train = self._delta(self.train_metric)
        if d_train is None:
            self.verdict = MonitorVerdict(streaks=dict(self.streaks))
            return self.verdict
        deltas = {self.train_metric: d_train}
        worst = None
        for name, sign in self.directions.items():
            d = self._delta(name)
            if d is None:
                continue
            deltas[name] = d
            bad = d_train >= self.min_rise and sign * d >= self.min_fall[name]
            self.streaks[name] = self.streaks[name] + 1 if bad else 0
            if self.streaks[name] >= self.patience and (
                worst is None or self.streaks[name] > self.streaks[worst]
            ):
                worst = name
        was = self.verdict.flagged
        if worst is None:
            self.verdict = MonitorVerdict(deltas=deltas, streaks=dict(self.streaks))
            return self.verdict
        way = "rose" if self.directions[worst] > 0 else "fell"
        unit = " standard errors" if self.units == "stderr" else ""
        reason = (f"step {self.step}: {self.train_metric} rose {d_train:+.4g}{unit} while held-out {worst} {way} "
                  f"{deltas[worst]:+.4g}{unit} ({self.streaks[worst]} consecutive checks, window {self.window}, "
                  f"reference {self.reference})")
        self.verdict = MonitorVerdict(True, not was, reason, self.action, deltas, dict(self.streaks))
        if not was:
            self.history.append((self.step, reason))
        return self.verdict
