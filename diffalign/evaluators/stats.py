"""Aggregates for evaluation tables: mean, std, percentile-bootstrap confidence intervals and paired win rates.

* ``std`` is the sample standard deviation (``ddof=1``; 0 for a single value).
* The CI is the percentile bootstrap: resample the N values with replacement ``n_boot`` times (seeded), take the
  statistic of each resample, report its ``(1 - c)/2`` and ``(1 + c)/2`` quantiles (numpy's linear interpolation).
* The win rate of A over B on paired samples (same prompt, same seed) counts a tie as half a win:
  ``(#(a > b) + 0.5 #(a == b)) / N`` (``a < b`` wins when lower is better). Its CI bootstraps the pairs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Summary:
    """Mean, std (ddof=1), percentile-bootstrap CI and count of one metric over one model's images."""

    mean: float
    std: float
    ci_low: float
    ci_high: float
    n: int
    confidence: float = 0.95

    def to_dict(self) -> dict:
        return asdict(self)


def bootstrap_ci(
    values: Sequence[float],
    *,
    statistic: Callable[[np.ndarray], np.ndarray] | None = None,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile-bootstrap CI of ``statistic`` (default: the mean) over ``values``.

    Args:
        values: shape (N,), N >= 1.
        statistic: maps resamples of shape (n_boot, N) to (n_boot,); default ``mean(axis=-1)``.
        n_boot: number of resamples.
        confidence: e.g. 0.95 for a 95% interval.
        seed: seeds ``numpy.random.default_rng``; the same seed gives the same interval.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"values must be a non-empty 1-D sequence. Got shape {x.shape}.")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1). Got {confidence}.")
    statistic = statistic or (lambda a: a.mean(axis=-1))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_boot, x.size))  # (n_boot, N)
    stats = statistic(x[idx])  # (n_boot,)
    alpha = 1.0 - confidence
    low, high = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def summarize(
    values: Sequence[float], *, n_boot: int = 1000, confidence: float = 0.95, seed: int = 0
) -> Summary:
    """:class:`Summary` of ``values`` (shape (N,))."""
    x = np.asarray(values, dtype=np.float64)
    low, high = bootstrap_ci(x, n_boot=n_boot, confidence=confidence, seed=seed)
    std = float(x.std(ddof=1)) if x.size > 1 else 0.0
    return Summary(float(x.mean()), std, low, high, int(x.size), confidence)


def win_indicators(a: Sequence[float], b: Sequence[float], *, higher_is_better: bool = True) -> np.ndarray:
    """Per-pair outcome for A: 1 win, 0.5 tie, 0 loss; shape (N,)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"a and b must be paired 1-D arrays of equal length. Got {a.shape} and {b.shape}.")
    if not higher_is_better:
        a, b = -a, -b
    return (a > b).astype(np.float64) + 0.5 * (a == b)


def win_rate(a: Sequence[float], b: Sequence[float], *, higher_is_better: bool = True) -> float:
    """Fraction of pairs where A beats B, ties counted as half."""
    return float(win_indicators(a, b, higher_is_better=higher_is_better).mean())


@dataclass(frozen=True)
class WinRate:
    rate: float
    ci_low: float
    ci_high: float
    wins: int
    ties: int
    losses: int
    n: int

    def to_dict(self) -> dict:
        return asdict(self)


def win_rate_summary(
    a: Sequence[float],
    b: Sequence[float],
    *,
    higher_is_better: bool = True,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> WinRate:
    """Win rate of A over B with a bootstrap CI over pairs and the win/tie/loss counts."""
    w = win_indicators(a, b, higher_is_better=higher_is_better)
    low, high = bootstrap_ci(w, n_boot=n_boot, confidence=confidence, seed=seed)
    return WinRate(
        rate=float(w.mean()),
        ci_low=low,
        ci_high=high,
        wins=int((w == 1).sum()),
        ties=int((w == 0.5).sum()),
        losses=int((w == 0).sum()),
        n=int(w.size),
    )
