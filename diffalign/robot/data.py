"""Robot preference data: a Pick-a-Pic-like pair row and DeformPAM's ranking-to-pairs rule.

A row is ``{obs, action_0 (H, Da), action_1, label_0}`` with ``label_0`` = 1 (action 0 better), 0 (action 1 better)
or 0.5 (equally good). DeformPAM's "not comparable" comparisons (code 3) are dropped when pairs are built.

DeformPAM ranking codes (``learning/datasets/runtime_dataset_real.py``): 0 = first better, 1 = second better,
2 = equally good, 3 = not comparable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

FIRST_BETTER, SECOND_BETTER, EQUAL, NOT_COMPARABLE = 0, 1, 2, 3


def ranking_to_comparisons(sorted_idx: Sequence[int], rest_idx: Sequence[int], k: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """DeformPAM's ``new_pipeline_finetune_sort`` rule: K comparisons from a partial ranking of candidates.

    ``sorted_idx``: candidates the annotator picked, best first; ``rest_idx``: the ones left "hard to distinguish".
    Emitted in this order until K exist: every sorted candidate against every unsorted one (sorted outer loop),
    then sorted × sorted from the largest rank distance down to adjacent ranks; the list is padded with
    "not comparable". The better candidate is always written first, so codes are 0 or 3.

    Returns ``pairs`` (K, 2) int64 candidate indices and ``codes`` (K,) int64.
    (``xiaoxiaoxh/DeformPAM`` @ 976b297, ``tools/run_annotation/operations.py``.)
    """
    sorted_idx, rest_idx = list(sorted_idx), list(rest_idx)
    pairs: list[tuple[int, int]] = []
    for i in sorted_idx:
        for j in rest_idx:
            if len(pairs) < k:
                pairs.append((i, j))
    for dist in range(len(sorted_idx) - 1, 0, -1):
        for i in range(len(sorted_idx) - dist):
            if len(pairs) < k:
                pairs.append((sorted_idx[i], sorted_idx[i + dist]))
    codes = [FIRST_BETTER] * len(pairs) + [NOT_COMPARABLE] * (k - len(pairs))
    pairs += [(0, 0)] * (k - len(pairs))
    return np.asarray(pairs, dtype=np.int64), np.asarray(codes, dtype=np.int64)


def simulated_annotator(rewards: np.ndarray, *, gap: float = 0.25) -> tuple[list[int], list[int]]:
    """A simulated DeformPAM annotator: pick the best remaining candidate while it is clearly (by more than ``gap``)
    better than the worst remaining one; the rest is "hard to distinguish". ``rewards`` (N,) hidden oracle values."""
    remaining = list(np.argsort(-rewards, kind="stable"))
    picked: list[int] = []
    while len(remaining) > 1 and rewards[remaining[0]] - rewards[remaining[-1]] > gap:
        picked.append(int(remaining.pop(0)))
    return picked, [int(i) for i in remaining]


@dataclass
class PreferencePairs:
    """M pairs: ``obs`` (M, ...), ``action_0`` / ``action_1`` (M, H, Da) float32, ``label_0`` (M,) in {1, 0, 0.5}."""

    obs: torch.Tensor
    action_0: torch.Tensor
    action_1: torch.Tensor
    label_0: torch.Tensor

    def __post_init__(self):
        m = self.obs.shape[0]
        for name in ("action_0", "action_1", "label_0"):
            if getattr(self, name).shape[0] != m:
                raise ValueError(f"{name} has {getattr(self, name).shape[0]} rows, obs has {m}")
        bad = ~((self.label_0 == 0) | (self.label_0 == 1) | (self.label_0 == 0.5))
        if bad.any():
            raise ValueError(f"label_0 must be 1, 0 or 0.5; got {self.label_0[bad][:5].tolist()}")

    def __len__(self) -> int:
        return self.obs.shape[0]

    @property
    def tie(self) -> torch.Tensor:
        return self.label_0 == 0.5

    def winners_losers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, H, Da) each: the better action first (ties keep their order)."""
        first = (self.label_0 >= 0.5)[:, None, None]
        return torch.where(first, self.action_0, self.action_1), torch.where(first, self.action_1, self.action_0)

    def flipped(self) -> PreferencePairs:
        """Sign-flipped labels (1 <-> 0, ties stay): the negative control."""
        return PreferencePairs(self.obs, self.action_0, self.action_1, 1.0 - self.label_0)

    def without_ties(self) -> PreferencePairs:
        keep = ~self.tie
        return PreferencePairs(self.obs[keep], self.action_0[keep], self.action_1[keep], self.label_0[keep])

    def subset(self, idx) -> PreferencePairs:
        return PreferencePairs(self.obs[idx], self.action_0[idx], self.action_1[idx], self.label_0[idx])

    @staticmethod
    def cat(parts: Sequence[PreferencePairs]) -> PreferencePairs:
        return PreferencePairs(*(torch.cat([getattr(p, f) for p in parts]) for f in
                                 ("obs", "action_0", "action_1", "label_0")))

    @staticmethod
    def from_rankings(obs: torch.Tensor, candidates: torch.Tensor, pairs: np.ndarray, codes: np.ndarray) -> PreferencePairs:
        """Rows from ranked candidates: ``obs`` (S, ...), ``candidates`` (S, N, H, Da), ``pairs`` (S, K, 2) and
        ``codes`` (S, K) as from :func:`ranking_to_comparisons`. Code 3 is dropped; 0 -> 1, 1 -> 0, 2 -> 0.5."""
        label_of = {FIRST_BETTER: 1.0, SECOND_BETTER: 0.0, EQUAL: 0.5}
        s_idx, k_idx = np.nonzero(codes != NOT_COMPARABLE)
        if len(s_idx) == 0:
            raise ValueError("no comparable pairs in the rankings")
        i, j = pairs[s_idx, k_idx, 0], pairs[s_idx, k_idx, 1]
        s_t = torch.as_tensor(s_idx)
        labels = torch.tensor([label_of[int(c)] for c in codes[s_idx, k_idx]], dtype=torch.float32)
        return PreferencePairs(obs[s_t], candidates[s_t, torch.as_tensor(i)], candidates[s_t, torch.as_tensor(j)], labels)

    @staticmethod
    def from_scores(obs: torch.Tensor, action_0: torch.Tensor, action_1: torch.Tensor, score_0, score_1, *,
                    tie_margin: float = 0.0) -> PreferencePairs:
        """Label by a score (oracle or learned reward): higher wins; ``|Δ| <= tie_margin`` is a tie."""
        s0, s1 = torch.as_tensor(score_0, dtype=torch.float32), torch.as_tensor(score_1, dtype=torch.float32)
        label = torch.where(s0 > s1, 1.0, 0.0)
        label = torch.where((s0 - s1).abs() <= tie_margin, 0.5, label) if tie_margin > 0 else label
        return PreferencePairs(obs, action_0, action_1, label)
