"""Win-rate and bootstrap-CI arithmetic on hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest

from diffalign.evaluators.stats import bootstrap_ci, summarize, win_indicators, win_rate, win_rate_summary


def test_win_rate_counts_ties_as_half():
    """a = (3, 2, 1, 5), b = (1, 2, 3, 4): win, tie, loss, win -> (2 + 0.5) / 4 = 0.625."""
    a, b = [3.0, 2.0, 1.0, 5.0], [1.0, 2.0, 3.0, 4.0]
    np.testing.assert_array_equal(win_indicators(a, b), [1.0, 0.5, 0.0, 1.0])
    assert win_rate(a, b) == 0.625
    assert win_rate(b, a) == 0.375  # complementary
    assert win_rate(a, b, higher_is_better=False) == 0.375
    s = win_rate_summary(a, b, n_boot=200)
    assert (s.wins, s.ties, s.losses, s.n) == (2, 1, 1, 4)
    assert s.ci_low <= 0.625 <= s.ci_high
    assert win_rate([1.0, 1.0], [1.0, 1.0]) == 0.5  # identical models
    with pytest.raises(ValueError, match="paired"):
        win_rate([1.0, 2.0], [1.0])


def test_summary_mean_std_by_hand():
    """(1, 2, 3, 6): mean 3, sample variance ((−2)² + (−1)² + 0² + 3²) / 3 = 14/3."""
    s = summarize([1.0, 2.0, 3.0, 6.0], n_boot=100)
    assert s.mean == 3.0
    assert s.std == pytest.approx((14 / 3) ** 0.5)
    assert s.n == 4 and s.confidence == 0.95
    assert summarize([5.0]).std == 0.0


def test_bootstrap_ci_hand_made_cases():
    # Constant data: every resample has the same mean.
    assert bootstrap_ci([2.5] * 7) == (2.5, 2.5)
    # Two values {0, 1}: resample means are 0, 0.5, 1 with probability 1/4, 1/2, 1/4. With many resamples the 2.5%
    # and 97.5% quantiles are exactly 0 and 1; the 30% and 70% quantiles (confidence 0.4) both fall in the 0.5
    # mass (P(mean = 0) = 0.25 < 0.3 and P(mean <= 0.5) = 0.75 > 0.7).
    assert bootstrap_ci([0.0, 1.0], n_boot=4000) == (0.0, 1.0)
    assert bootstrap_ci([0.0, 1.0], n_boot=4000, confidence=0.4) == (0.5, 0.5)


def test_bootstrap_ci_is_the_percentile_of_resampled_means():
    """Same seed -> the same resamples as an explicit re-implementation of the percentile bootstrap."""
    x = np.array([0.3, 1.7, 2.2, 0.9, 5.0, 3.1])
    rng = np.random.default_rng(7)
    idx = rng.integers(0, x.size, size=(500, x.size))
    means = x[idx].mean(axis=1)
    expected = tuple(np.quantile(means, [0.025, 0.975]))
    assert bootstrap_ci(x, n_boot=500, seed=7) == pytest.approx(expected)
    assert bootstrap_ci(x, n_boot=500, seed=7) == bootstrap_ci(x, n_boot=500, seed=7)  # deterministic
    low, high = bootstrap_ci(x, n_boot=500, seed=7)
    assert low < x.mean() < high
