"""Entropic optimal transport for RAPL rewards: batched log-domain Sinkhorn and the OT reward.

With uniform marginals ``a = 1/n``, ``b = 1/m`` and cost ``C`` (n, m), Sinkhorn solves

.. math::  P^* = \\arg\\min_{P 1 = a,\\ P^T 1 = b} \\langle P, C\\rangle - ε H(P)

by alternating the dual updates (log domain, stable for small ε)

.. math::  f_i = ε \\log a_i - ε \\operatorname{LSE}_j\\big((g_j - C_{ij})/ε\\big), \\qquad
           g_j = ε \\log b_j - ε \\operatorname{LSE}_i\\big((f_i - C_{ij})/ε\\big), \\qquad
           P_{ij} = \\exp\\big((f_i + g_j - C_{ij})/ε\\big).

It is differentiable by unrolling. ε = 1 is RAPL parity: the ddn ``OptimalTransportLayer(gamma=1)`` that RAPL's code
uses minimises ``<P, M> + 1/γ KL(P || r cᵀ)``, i.e. ε = 1/γ. With a cosine cost in [0, 2], ε = 1 gives an almost
uniform plan; toy tasks may prefer ε ≈ 0.05–0.1. ``0 <= <P_ε, C> - OT <= ε log min(n, m)`` for uniform marginals.

RAPL reward of a trajectory ξ (T frames) against a demonstration ξ^E (T' frames), embeddings φ:

.. math::  C_{tj} = 1 - \\cos(φ(o_t), φ(o^E_j)), \\qquad r_t = -\\sum_j P^*_{tj} C_{tj}, \\qquad R(ξ) = \\sum_t r_t

taken against the demonstration with the highest R (``thomasrantian/mvp`` ``mvp/ppo/ppo.py`` @ 3274577).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

COSTS = ("cosine", "euclidean")
DEMO_REDUCTIONS = ("best", "mean")


def sinkhorn(cost: torch.Tensor, eps: float = 1.0, n_iters: int = 100, *, tol: float | None = None,
             round_to_marginals: bool = True) -> torch.Tensor:
    """Entropic OT plan with uniform marginals for ``cost`` (n, m) or (B, n, m); returns P of the same shape.

    Log-domain iterations, batched over B, differentiable (unrolled). ``tol`` (optional) stops early once the row
    marginals are within ``tol`` (max abs error; the column marginals are exact after each g update), checked
    every 10 iterations. Computation is in float32 at least (float64 inputs stay float64).

    ``round_to_marginals`` (default) finishes with the rounding step of Altschuler, Weed & Rigollet (NeurIPS 2017,
    Algorithm 2), which makes the marginals exact when few iterations at a small ε have not converged yet; on a
    converged plan it changes nothing measurable.
    """
    if cost.ndim not in (2, 3):
        raise ValueError(f"cost must be (n, m) or (B, n, m), got shape {tuple(cost.shape)}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    squeeze = cost.ndim == 2
    c = cost.unsqueeze(0) if squeeze else cost  # (B, n, m)
    if c.dtype not in (torch.float32, torch.float64):
        c = c.float()
    b, n, m = c.shape
    log_a, log_b = -math.log(n), -math.log(m)
    f = torch.zeros(b, n, dtype=c.dtype, device=c.device)
    g = torch.zeros(b, m, dtype=c.dtype, device=c.device)
    for it in range(n_iters):
        f = eps * log_a - eps * torch.logsumexp((g[:, None, :] - c) / eps, dim=2)  # (B, n)
        g = eps * log_b - eps * torch.logsumexp((f[:, :, None] - c) / eps, dim=1)  # (B, m)
        if tol is not None and (it + 1) % 10 == 0:
            with torch.no_grad():
                rows = torch.exp((f[:, :, None] + g[:, None, :] - c) / eps).sum(dim=2)
                if (rows - 1.0 / n).abs().max() < tol:
                    break
    plan = torch.exp((f[:, :, None] + g[:, None, :] - c) / eps)  # (B, n, m)
    if round_to_marginals:
        plan = _round_to_uniform_marginals(plan)
    return plan.squeeze(0) if squeeze else plan


def _round_to_uniform_marginals(plan: torch.Tensor) -> torch.Tensor:
    """Project a positive (B, n, m) plan onto the transport polytope with uniform marginals (Altschuler et al. 2017):
    scale rows down to at most 1/n, columns down to at most 1/m, then add the rank-one correction of the deficit."""
    _, n, m = plan.shape
    x = plan * torch.clamp((1.0 / n) / plan.sum(dim=2, keepdim=True), max=1.0)  # rows <= 1/n
    x = x * torch.clamp((1.0 / m) / x.sum(dim=1, keepdim=True), max=1.0)  # columns <= 1/m
    err_r = (1.0 / n - x.sum(dim=2)).clamp(min=0.0)  # (B, n); >= 0 up to float rounding
    err_c = (1.0 / m - x.sum(dim=1)).clamp(min=0.0)  # (B, m)
    total = err_r.sum(dim=1).clamp(min=torch.finfo(plan.dtype).tiny)[:, None, None]
    return x + err_r[:, :, None] * err_c[:, None, :] / total


def cosine_cost(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``1 - cos(x_i, y_j)``: x (..., n, d), y (..., m, d) -> (..., n, m), in [0, 2]."""
    return 1.0 - F.normalize(x, dim=-1) @ F.normalize(y, dim=-1).transpose(-1, -2)


def euclidean_cost(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``||x_i - y_j||_2``: x (..., n, d), y (..., m, d) -> (..., n, m) (RAPL HEAD script's cost)."""
    return torch.cdist(x, y)


def pairwise_cost(x: torch.Tensor, y: torch.Tensor, cost: str = "cosine") -> torch.Tensor:
    if cost == "cosine":
        return cosine_cost(x, y)
    if cost == "euclidean":
        return euclidean_cost(x, y)
    raise ValueError(f"cost must be one of {COSTS}, got {cost!r}")


def ot_step_rewards(x: torch.Tensor, y: torch.Tensor, *, eps: float = 1.0, n_iters: int = 100,
                    cost: str = "cosine") -> torch.Tensor:
    """Per-step OT rewards ``r_t = -Σ_j P_tj C_tj`` of x (B, T, d) against y (B, T', d): (B, T).

    Rows of the plan index x's frames (the trajectory being scored), as in RAPL's ``ppo.py``.
    """
    c = pairwise_cost(x, y, cost)  # (B, T, T')
    plan = sinkhorn(c, eps=eps, n_iters=n_iters)
    return -(plan * c).sum(dim=-1)


def ot_reward(traj_emb: torch.Tensor, demo_embs: torch.Tensor, *, eps: float = 1.0, n_iters: int = 100,
              cost: str = "cosine", reduce: str = "best") -> tuple[torch.Tensor, torch.Tensor]:
    """RAPL reward of B trajectories against K demonstrations.

    ``traj_emb`` (B, T, d); ``demo_embs`` (K, T', d) shared by all trajectories, or (B, K, T', d) per trajectory
    (e.g. demonstrations of the same task instance). Returns ``(total, per_step)``: (B,) and (B, T). ``reduce``:
    ``best`` takes, per trajectory, the demonstration with the highest total (RAPL's closest demo); ``mean``
    averages over demonstrations.
    """
    if reduce not in DEMO_REDUCTIONS:
        raise ValueError(f"reduce must be one of {DEMO_REDUCTIONS}, got {reduce!r}")
    b, t, d = traj_emb.shape
    if demo_embs.ndim == 3:
        demo_embs = demo_embs[None].expand(b, *demo_embs.shape)
    if demo_embs.ndim != 4 or demo_embs.shape[0] != b:
        raise ValueError(f"demo_embs must be (K, T', d) or ({b}, K, T', d), got {tuple(demo_embs.shape)}")
    k, t_demo = demo_embs.shape[1:3]
    x = traj_emb[:, None].expand(b, k, t, d).reshape(b * k, t, d)  # (B*K, T, d)
    y = demo_embs.reshape(b * k, t_demo, d)  # (B*K, T', d)
    per_step = ot_step_rewards(x, y, eps=eps, n_iters=n_iters, cost=cost).view(b, k, t)
    totals = per_step.sum(dim=-1)  # (B, K)
    if reduce == "mean":
        return totals.mean(dim=1), per_step.mean(dim=1)
    best = totals.argmax(dim=1)  # (B,)
    idx = torch.arange(b, device=traj_emb.device)
    return totals[idx, best], per_step[idx, best]
