"""Sinkhorn and the OT reward: marginals, the entropic bound against exact LP/assignment solutions, gradients."""

import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment, linprog

from diffalign.robot import cosine_cost, ot_reward, ot_step_rewards, sinkhorn


def _cosine_cost(n, m, d=32, seed=0):
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(n, d)), rng.normal(size=(m, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    return 1.0 - x @ y.T


def _lp_ot(cost):
    """Exact OT with uniform marginals by linear programming (HiGHS)."""
    n, m = cost.shape
    a_eq = np.zeros((n + m, n * m))
    for i in range(n):
        a_eq[i, i * m:(i + 1) * m] = 1.0
    for j in range(m):
        a_eq[n + j, j::m] = 1.0
    b_eq = np.concatenate([np.full(n, 1.0 / n), np.full(m, 1.0 / m)])
    res = linprog(cost.ravel(), A_eq=a_eq, b_eq=b_eq, bounds=(0, None), method="highs")
    assert res.status == 0
    return res.fun


@pytest.mark.parametrize("eps", [1.0, 0.1, 0.05])
@pytest.mark.parametrize("shape", [(6, 6), (5, 9), (12, 7)])
def test_marginals_match_uniform_inputs(shape, eps):
    cost = torch.from_numpy(_cosine_cost(*shape, seed=shape[0] * 31 + shape[1]))
    plan = sinkhorn(cost, eps=eps, n_iters=500)
    n, m = shape
    assert plan.shape == shape
    assert torch.allclose(plan.sum(1), torch.full((n,), 1.0 / n, dtype=plan.dtype), atol=1e-4)
    assert torch.allclose(plan.sum(0), torch.full((m,), 1.0 / m, dtype=plan.dtype), atol=1e-4)
    assert (plan >= 0).all()


@pytest.mark.parametrize("eps", [0.1, 0.05, 0.01])
@pytest.mark.parametrize("shape", [(6, 6), (5, 8), (10, 4)])
def test_ot_cost_within_entropic_bound_of_lp(shape, eps):
    """0 <= <P_eps, C> - OT <= eps * log(min(n, m)) with OT from scipy's LP solver."""
    cost = _cosine_cost(*shape, seed=7 + shape[0])
    exact = _lp_ot(cost)
    plan = sinkhorn(torch.from_numpy(cost), eps=eps, n_iters=3000).numpy()
    entropic = float((plan * cost).sum())
    assert -1e-4 <= entropic - exact <= eps * math.log(min(shape)) + 1e-4


@pytest.mark.parametrize("eps", [0.05, 0.01])
def test_default_iterations_still_meet_marginals_and_bound(eps):
    """With the public defaults (100 iterations) a small ε has not converged; the final rounding step keeps the plan
    feasible, so the marginals hold and <P, C> >= OT (the lower half of the bound) holds exactly."""
    for seed in range(3):
        cost = _cosine_cost(7, 5, seed=seed)
        plan = sinkhorn(torch.from_numpy(cost), eps=eps)
        assert torch.allclose(plan.sum(1), torch.full((7,), 1 / 7, dtype=plan.dtype), atol=1e-6)
        assert torch.allclose(plan.sum(0), torch.full((5,), 1 / 5, dtype=plan.dtype), atol=1e-6)
        gap = float((plan.numpy() * cost).sum()) - _lp_ot(cost)
        assert -1e-6 <= gap <= eps * math.log(5) + 1e-4


@pytest.mark.parametrize("n", [4, 8])
def test_square_case_matches_assignment(n):
    """For n = m the uniform-marginal OT is an assignment: OT = mean of the optimal matching's costs."""
    cost = _cosine_cost(n, n, seed=n)
    r, c = linear_sum_assignment(cost)
    exact = cost[r, c].sum() / n
    eps = 0.02
    plan = sinkhorn(torch.from_numpy(cost), eps=eps, n_iters=5000).numpy()
    gap = float((plan * cost).sum()) - exact
    assert -1e-4 <= gap <= eps * math.log(n) + 1e-4
    # and the plan puts most of its mass on the optimal assignment
    assert plan[r, c].sum() > 0.5


def test_batched_equals_unbatched_and_keeps_shape():
    costs = torch.stack([torch.from_numpy(_cosine_cost(5, 7, seed=s)) for s in range(3)]).float()
    batched = sinkhorn(costs, eps=0.1, n_iters=200)
    assert batched.shape == (3, 5, 7)
    for b in range(3):
        assert torch.allclose(batched[b], sinkhorn(costs[b], eps=0.1, n_iters=200), atol=1e-6)


def test_eps_one_is_nearly_uniform_rapl_parity():
    """RAPL parity eps = 1 with a cosine cost: the plan is close to uniform (max/min about 2, research note §2.4)."""
    plan = sinkhorn(torch.from_numpy(_cosine_cost(6, 6, seed=0)), eps=1.0)
    ratio = (plan.max() / plan.min()).item()
    assert 1.0 < ratio < 4.0


def test_differentiable_and_matches_finite_differences():
    torch.manual_seed(0)
    cost = torch.rand(2, 3, 4, dtype=torch.float64, requires_grad=True)

    def f(c):
        return (sinkhorn(c, eps=0.3, n_iters=60) * c).sum()

    assert torch.autograd.gradcheck(f, (cost,), eps=1e-6, atol=1e-4)


def test_small_eps_is_stable_in_log_domain():
    cost = torch.from_numpy(_cosine_cost(8, 8, seed=3)) * 50  # entries up to 100, eps 0.01: exp(-1e4) underflows
    plan = sinkhorn(cost, eps=0.01, n_iters=200)
    assert torch.isfinite(plan).all()
    assert torch.allclose(plan.sum(0), torch.full((8,), 1 / 8, dtype=plan.dtype), atol=1e-4)


def test_input_validation():
    with pytest.raises(ValueError, match="cost must be"):
        sinkhorn(torch.zeros(5))
    with pytest.raises(ValueError, match="eps must be"):
        sinkhorn(torch.zeros(3, 3), eps=0.0)


def test_ot_reward_prefers_the_matching_trajectory_and_picks_the_closest_demo():
    torch.manual_seed(0)
    demo = torch.randn(1, 6, 8)
    near = demo + 0.05 * torch.randn(1, 6, 8)
    far = torch.randn(1, 6, 8)
    total, per_step = ot_reward(torch.cat([near, far]), torch.cat([torch.randn(1, 6, 8), demo]), eps=0.05)
    assert per_step.shape == (2, 6)
    assert total[0] > total[1]
    assert torch.allclose(total, per_step.sum(1))
    # the total against the chosen demo is the best over demos
    direct = ot_step_rewards(near, demo, eps=0.05).sum(1)
    assert torch.allclose(total[0:1], direct, atol=1e-6)
    # per-trajectory demonstrations (B, K, T', d) give the same answer as the shared set here
    shared = torch.cat([torch.randn(1, 6, 8), demo])
    t1, _ = ot_reward(torch.cat([near, far]), shared, eps=0.05)
    t2, _ = ot_reward(torch.cat([near, far]), shared[None].expand(2, -1, -1, -1), eps=0.05)
    assert torch.allclose(t1, t2)


def test_cosine_cost_range():
    x, y = torch.randn(3, 4, 5), torch.randn(3, 6, 5)
    c = cosine_cost(x, y)
    assert c.shape == (3, 4, 6)
    assert (c >= -1e-6).all() and (c <= 2 + 1e-6).all()
