import math

import pytest
import torch
import torch.nn.functional as F

from diffalign.objectives import PairErrors, build_objective, dpo_loss


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def test_dpo_equals_ln2_when_policy_equals_reference():
    e = t(0.3, 0.1, 0.7)
    assert dpo_loss(e, e + 0.05, e, e + 0.05).item() == pytest.approx(math.log(2), abs=1e-12)


def test_dpo_worked_case_from_note():
    """β=5000: e_θ^w=0.1000, e_θ^l=0.1002, e_ref^w=e_ref^l=0.1001 -> inside = -2500·(-0.0002) = 0.5,
    loss = -log σ(0.5) = log(1 + e^-0.5) = 0.474077 (objectives.md §9)."""
    loss = dpo_loss(t(0.1000), t(0.1002), t(0.1001), t(0.1001), beta=5000.0)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.5)), abs=1e-6)
    assert loss.item() == pytest.approx(0.474077, abs=1e-6)


def test_dpo_matches_diffusers_sd15_convention():
    """diffusers SD1.5: -logsigmoid(2500 · (ref_diff - model_diff)) with no 1/2 equals our β=5000."""
    g = torch.Generator().manual_seed(0)
    mw, ml, rw, rl = (0.1 + 0.01 * torch.rand(8, generator=g, dtype=torch.float64) for _ in range(4))
    theirs = -F.logsigmoid(2500 * ((rw - rl) - (mw - ml))).mean()
    assert dpo_loss(mw, ml, rw, rl, beta=5000.0).item() == pytest.approx(theirs.item(), rel=1e-12)


def test_lowering_winner_error_lowers_loss_and_gradient_sign():
    mw = t(0.1, 0.2).requires_grad_()
    ml, rw, rl = t(0.1, 0.2), t(0.1, 0.2), t(0.1, 0.2)
    loss = dpo_loss(mw, ml, rw, rl, beta=100.0)
    loss.backward()
    assert (mw.grad > 0).all()  # d loss / d e_w > 0: descending lowers the winner's error
    assert dpo_loss(mw.detach() - 0.001, ml, rw, rl, beta=100.0) < loss
    assert dpo_loss(mw.detach(), ml - 0.001, rw, rl, beta=100.0) > loss  # lowering the loser's error hurts


def test_registered_objective_metrics():
    obj, spec = build_objective("dpo")
    assert spec.needs_reference
    e = PairErrors(t(0.1, 0.2), t(0.3, 0.2), t(0.1, 0.2), t(0.3, 0.2))
    out = obj(e)
    assert out.loss.item() == pytest.approx(math.log(2))
    assert out.metrics["rewards/accuracies"] == 0.5  # ties (logit 0) count half
    e2 = PairErrors(t(0.09, 0.2), t(0.3, 0.21), t(0.1, 0.2), t(0.3, 0.2))
    assert obj(e2).metrics["rewards/accuracies"] == 1.0


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        dpo_loss(torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(2, 2))
