"""Robot losses: hand-worked values, special cases, reuse of the package's DPO objective, finite gradients."""

import math

import pytest
import torch

from diffalign.objectives import dpo_loss
from diffalign.robot import (
    deformpam_logits,
    deformpam_loss,
    pair_dpo_losses,
    preference_losses_with_ties,
    rapl_triplet_loss,
    triplet_probability,
)


def test_deformpam_loss_hand_worked():
    """model_w - ref_w = 0.01, model_l - ref_l = 0.03, so Δ = -0.02 and -β Δ = 2 at β = 100:
    loss = -σ(2) = -1 / (1 + e^-2) = -0.880797."""
    mw, ml, rw, rl = torch.tensor([0.11]), torch.tensor([0.33]), torch.tensor([0.10]), torch.tensor([0.30])
    assert deformpam_logits(mw, ml, rw, rl, beta=100.0).item() == pytest.approx(2.0, abs=1e-5)
    assert deformpam_loss(mw, ml, rw, rl, beta=100.0).item() == pytest.approx(-1 / (1 + math.exp(-2)), abs=1e-6)


def test_identical_policy_and_reference_special_values():
    e = torch.rand(5)
    assert deformpam_loss(e, e, e, e).item() == pytest.approx(-0.5)
    assert pair_dpo_losses(e, e, e, e, beta=5000.0, form="logsigmoid").mean().item() == pytest.approx(math.log(2))


def test_logsigmoid_form_is_the_package_dpo_loss():
    g = torch.Generator().manual_seed(0)
    mw, ml, rw, rl = (torch.rand(16, generator=g) for _ in range(4))
    for beta in (100.0, 5000.0):
        ours = pair_dpo_losses(mw, ml, rw, rl, beta=beta, form="logsigmoid").mean()
        assert torch.allclose(ours, dpo_loss(mw, ml, rw, rl, beta=beta))
    # the DeformPAM logit is the Diffusion-DPO logit at 2β (no 1/2)
    assert torch.allclose(pair_dpo_losses(mw, ml, rw, rl, beta=100.0, form="deformpam").mean(),
                          deformpam_loss(mw, ml, rw, rl, beta=100.0))


def test_ties_dropped_or_sft():
    mw, ml = torch.tensor([0.2, 0.4]), torch.tensor([0.3, 0.6])
    rw, rl = torch.tensor([0.2, 0.4]), torch.tensor([0.3, 0.6])
    tie = torch.tensor([False, True])
    losses, valid = preference_losses_with_ties(mw, ml, rw, rl, tie, beta=100.0, form="deformpam", tie_mode="drop")
    assert valid.tolist() == [1.0, 0.0] and losses[1].item() == 0.0
    losses, valid = preference_losses_with_ties(mw, ml, rw, rl, tie, beta=100.0, form="deformpam", tie_mode="sft",
                                                sft_weight=2.0)
    assert valid.tolist() == [1.0, 1.0]
    assert losses[1].item() == pytest.approx(2.0 * (0.4 + 0.6) / 2)
    with pytest.raises(ValueError, match="tie_mode"):
        preference_losses_with_ties(mw, ml, rw, rl, tie, beta=1.0, tie_mode="keep")


def test_triplet_losses_hand_worked():
    """R(B|A) = -0.2, R(C|A) = -0.9: p = σ(0.7) = 0.668188; bt = -log p = 0.403186; rapl_code = 1 - p = 0.331812;
    tie term (0.5 - p)² = 0.028287."""
    rb, rc = torch.tensor([-0.2]), torch.tensor([-0.9])
    p = triplet_probability(rb, rc).item()
    assert p == pytest.approx(0.668188, abs=1e-6)
    assert rapl_triplet_loss(rb, rc, form="bt").item() == pytest.approx(0.403186, abs=1e-6)
    assert rapl_triplet_loss(rb, rc, form="rapl_code").item() == pytest.approx(0.331812, abs=1e-6)
    assert rapl_triplet_loss(rb, rc).item() == pytest.approx(0.331812, abs=1e-6)  # the author code's form
    assert rapl_triplet_loss(rb, rc, tie=torch.tensor([True])).item() == pytest.approx(0.028287, abs=1e-6)
    # p matches the exp form of the RAPL code
    assert p == pytest.approx(math.exp(-0.2) / (math.exp(-0.2) + math.exp(-0.9)))


@pytest.mark.parametrize("form", ["logsigmoid", "deformpam"])
def test_dpo_gradients_finite_and_push_the_winner(form):
    mw = torch.tensor([0.3, 0.5], requires_grad=True)
    ml = torch.tensor([0.4, 0.2], requires_grad=True)
    loss = pair_dpo_losses(mw, ml, torch.tensor([0.3, 0.5]), torch.tensor([0.4, 0.2]), beta=100.0, form=form).mean()
    loss.backward()
    assert torch.isfinite(mw.grad).all() and torch.isfinite(ml.grad).all()
    assert (mw.grad > 0).all() and (ml.grad < 0).all()  # descent lowers the winner's error, raises the loser's


def test_unknown_forms_raise():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="form must be one of"):
        pair_dpo_losses(x, x, x, x, beta=1.0, form="cpl")
    with pytest.raises(ValueError, match="form must be one of"):
        rapl_triplet_loss(x, x, form="hinge")
