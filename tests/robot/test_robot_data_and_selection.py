"""Ranking-to-pairs rule, preference rows, best-of-N estimator and selectors (deterministic, no training)."""

import itertools

import numpy as np
import pytest
import torch

from diffalign.robot import (
    PreferencePairs,
    RewardGuidedSelector,
    expected_max_of_n,
    ranking_to_comparisons,
    select_by_reward,
    simulated_annotator,
)


def test_ranking_to_comparisons_follows_the_deformpam_order():
    """Sorted [5, 2, 7], unsorted [0, 1]: sorted x unsorted (5>0, 5>1, 2>0, 2>1, 7>0, 7>1), then sorted x sorted by
    decreasing rank distance (5>7, then 5>2, 2>7), then padding with code 3."""
    pairs, codes = ranking_to_comparisons([5, 2, 7], [0, 1], k=10)
    assert pairs[:9].tolist() == [[5, 0], [5, 1], [2, 0], [2, 1], [7, 0], [7, 1], [5, 7], [5, 2], [2, 7]]
    assert codes.tolist() == [0] * 9 + [3]
    pairs, codes = ranking_to_comparisons([5, 2, 7], [0, 1], k=4)  # capped at K
    assert pairs.tolist() == [[5, 0], [5, 1], [2, 0], [2, 1]] and codes.tolist() == [0] * 4


def test_from_rankings_drops_not_comparable_and_maps_codes():
    obs = torch.arange(2, dtype=torch.float32)[:, None]
    cands = torch.arange(2 * 3 * 2 * 1, dtype=torch.float32).view(2, 3, 2, 1)
    pairs = np.array([[[0, 1], [2, 1], [0, 0]], [[1, 2], [0, 2], [0, 0]]])
    codes = np.array([[0, 1, 3], [2, 0, 3]])
    rows = PreferencePairs.from_rankings(obs, cands, pairs, codes)
    assert len(rows) == 4
    assert rows.label_0.tolist() == [1.0, 0.0, 0.5, 1.0]
    assert torch.equal(rows.action_0[1], cands[0, 2]) and torch.equal(rows.action_1[1], cands[0, 1])
    w, _ = rows.winners_losers()
    assert torch.equal(w[1], cands[0, 1])  # code 1: the second one is better
    flipped = rows.flipped()
    assert flipped.label_0.tolist() == [0.0, 1.0, 0.5, 0.0]
    assert len(rows.without_ties()) == 3


def test_preference_pairs_validate_labels():
    x = torch.zeros(2, 3, 2)
    with pytest.raises(ValueError, match="label_0"):
        PreferencePairs(torch.zeros(2, 1), x, x, torch.tensor([1.0, 0.3]))


def test_simulated_annotator_stops_when_the_rest_is_indistinguishable():
    picked, rest = simulated_annotator(np.array([-0.1, -2.0, -0.2, -2.1, -1.0]), gap=0.25)
    assert picked == [0, 2, 4] and sorted(rest) == [1, 3]


def _brute_force_expected_max(pool, n):
    return np.mean([max(c) for c in itertools.combinations(pool, n)])


def test_expected_max_of_n_is_exact_and_non_decreasing_in_n():
    rng = np.random.default_rng(0)
    for _ in range(20):
        pool = rng.normal(size=10)
        estimates = [expected_max_of_n(pool, n) for n in range(1, 11)]
        for n in (1, 3, 6):
            assert estimates[n - 1] == pytest.approx(_brute_force_expected_max(pool, n))
        assert all(b >= a - 1e-12 for a, b in itertools.pairwise(estimates))
        assert estimates[0] == pytest.approx(pool.mean()) and estimates[-1] == pytest.approx(pool.max())
    batched = expected_max_of_n(rng.normal(size=(4, 16)), 4)
    assert batched.shape == (4,)
    with pytest.raises(ValueError):
        expected_max_of_n(pool, 11)


def test_select_by_reward_orders_and_keeps_fallbacks():
    cands = torch.arange(2 * 4, dtype=torch.float32).view(2, 4, 1, 1)
    rewards = torch.tensor([[0.1, 0.9, 0.5, 0.9], [3.0, 2.0, 1.0, 0.0]])
    sel = select_by_reward(cands, rewards)
    assert sel.order.tolist() == [[1, 3, 2, 0], [0, 1, 2, 3]]  # stable: the earlier of two equal rewards first
    assert sel.index.tolist() == [1, 0]
    assert torch.equal(sel.actions, cands[[0, 1], [1, 0]])


def test_reward_guided_selector_with_an_explicit_reward():
    class Sampler:
        def sample_candidates(self, obs, n, generator=None):
            return torch.randn(obs.shape[0], n, 3, 2, generator=generator)

    reward = lambda obs, c: -c.pow(2).sum(dim=(2, 3))
    selector = RewardGuidedSelector(Sampler(), reward, n_candidates=8)
    sel = selector(torch.zeros(5, 1), generator=torch.Generator().manual_seed(0))
    norms = sel.candidates.pow(2).sum(dim=(2, 3))
    assert torch.equal(sel.index, norms.argmin(dim=1))
    assert sel.actions.shape == (5, 3, 2)
