import math

import pytest
import torch

from diffalign.objectives import build_objective, mapo_loss, phi
from diffalign.objectives.base import PairErrors
from fixtures.data import base_config
from diffalign.training.config import parse_config
from diffalign.training.trainer import PreferenceTrainer


def official_mapo(ew, el, beta=0.1, s=0.5, T=1000):
    """Line-by-line the official compute_loss (mapo-t2i/mapo utils.py)."""
    log_odds = (s * ew) / (torch.exp(s * ew) - 1) - (s * el) / (torch.exp(s * el) - 1)
    ratio = torch.nn.functional.logsigmoid(log_odds * T)
    return ew.mean() - (beta * ratio).mean()


def test_worked_values_from_note():
    """e_w=0.10, e_l=0.12: φ(0.05)=0.975208, φ(0.06)=0.970300, log-odds 0.0049083,
    logσ(4.9083) = -0.0073576 -> 0.10 + 0.1·0.0073576 = 0.1007358; equal errors: 0.10 + 0.1·ln 2."""
    d = torch.float64
    assert mapo_loss(torch.tensor([0.10], dtype=d), torch.tensor([0.12], dtype=d)).item() == pytest.approx(
        0.1007358, abs=1e-7)
    assert mapo_loss(torch.tensor([0.10], dtype=d), torch.tensor([0.10], dtype=d)).item() == pytest.approx(
        0.10 + 0.1 * math.log(2), abs=1e-9)
    assert phi(torch.tensor(0.05, dtype=d)).item() == pytest.approx(0.975208, abs=1e-6)


def test_matches_official_form_and_is_finite_at_zero():
    g = torch.Generator().manual_seed(0)
    ew, el = torch.rand(16, generator=g, dtype=torch.float64), torch.rand(16, generator=g, dtype=torch.float64)
    assert mapo_loss(ew, el).item() == pytest.approx(official_mapo(ew, el).item(), rel=1e-12)
    z = torch.zeros(3, requires_grad=True)
    loss = mapo_loss(z, torch.zeros(3))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()


def test_gradient_direction():
    ew = torch.tensor([0.2, 0.3], dtype=torch.float64, requires_grad=True)
    el = torch.tensor([0.25, 0.3], dtype=torch.float64, requires_grad=True)
    mapo_loss(ew, el).backward()
    assert (ew.grad > 0).all()  # lower winner error -> lower loss
    assert (el.grad < 0).all()  # higher loser error -> lower loss


def test_objective_mean_equals_public_function():
    obj, spec = build_objective("mapo")
    assert not spec.needs_reference
    ew, el = torch.rand(5, dtype=torch.float64), torch.rand(5, dtype=torch.float64)
    assert obj(PairErrors(ew, el)).loss.item() == pytest.approx(mapo_loss(ew, el).item(), rel=1e-12)


def test_trainer_makes_no_reference_call_and_holds_no_reference(tiny_sd15_dir, pickapic_dir, tmp_path):
    cfg = parse_config(base_config(tiny_sd15_dir, pickapic_dir, tmp_path / "run", objective="mapo", max_steps=2,
                                   checkpoint_every=None, **{"model.lora": None}))
    tr = PreferenceTrainer(cfg).setup()
    assert tr.reference is None
    n_params = sum(p.numel() for p in tr.accelerator.unwrap_model(tr.unet).parameters())
    calls = []
    tr.accelerator.unwrap_model(tr.unet).register_forward_pre_hook(lambda m, a: calls.append(torch.is_grad_enabled()))
    tr.train()
    assert calls == [True, True]  # one policy call per step, never a no-grad reference call
    # no module other than the policy holds U-Net-sized weights
    held = [m for m in vars(tr).values() if isinstance(m, torch.nn.Module)]
    assert sum(p.numel() for m in held for p in m.parameters()) == n_params
    tr.cleanup()
