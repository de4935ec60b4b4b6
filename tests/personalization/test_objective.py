"""The `ppd` objective: hand-worked values, the ln 2 special case, gradients, registration and config checks."""

import math

import pytest
import torch

from diffalign.objectives import PairErrors, build_objective, dpo_loss, get_objective_spec
from diffalign.personalization import PPDConfig, ppd_loss, ppd_losses

D = torch.float64


def one(x):
    return torch.tensor([x], dtype=D)


def test_ppd_loss_by_hand():
    """β = 5000, e_θ^w(u) = 0.1000, e_θ^l(u) = 0.1002, e_ref^w = e_ref^l = 0.1001:
    inside = -2500·[(0.1000 - 0.1001) - (0.1002 - 0.1001)] = -2500·(-0.0002) = 0.5,
    loss = -log σ(0.5) = log(1 + e^{-0.5}) = 0.474077."""
    loss = ppd_loss(one(0.1000), one(0.1002), one(0.1001), one(0.1001), beta=5000.0)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.5)), abs=1e-9)
    assert loss.item() == pytest.approx(0.474077, abs=1e-6)
    # two pairs (two users), mean over the batch: the second pair has inside = -2500·(0.0004) = -1
    mw, ml = torch.tensor([0.1000, 0.3004], dtype=D), torch.tensor([0.1002, 0.3000], dtype=D)
    rw, rl = torch.tensor([0.1001, 0.3000], dtype=D), torch.tensor([0.1001, 0.3000], dtype=D)
    want = (math.log1p(math.exp(-0.5)) + math.log1p(math.exp(1.0))) / 2
    assert ppd_loss(mw, ml, rw, rl).item() == pytest.approx(want, abs=1e-9)
    assert ppd_losses(mw, ml, rw, rl).shape == (2,)
    assert ppd_loss(mw, ml, rw, rl).item() == pytest.approx(dpo_loss(mw, ml, rw, rl).item(), abs=1e-12)


def test_policy_equal_reference_gives_ln2():
    e = torch.tensor([0.2, 0.05, 1.3], dtype=D)
    assert ppd_loss(e, e.flip(0), e, e.flip(0)).item() == pytest.approx(math.log(2), abs=1e-12)


def test_gradients_are_finite_and_push_winner_error_down():
    mw = torch.tensor([0.10, 0.20], dtype=D, requires_grad=True)
    ml = torch.tensor([0.12, 0.18], dtype=D, requires_grad=True)
    ref = torch.tensor([0.11, 0.19], dtype=D)
    ppd_loss(mw, ml, ref, ref, beta=5000.0).backward()
    assert torch.isfinite(mw.grad).all() and torch.isfinite(ml.grad).all()
    assert (mw.grad > 0).all() and (ml.grad < 0).all()  # descent lowers e_θ^w and raises e_θ^l


def test_registered_with_recipe_and_metrics():
    from diffalign.personalization.trainer import PersonalizedTrainer
    from diffalign.training.config import parse_config
    from diffalign.training.trainer import trainer_class

    spec = get_objective_spec("ppd")
    assert spec.needs_reference
    from fixtures.data import base_config

    cfg = parse_config(base_config("model", "data", "out", objective="ppd"))
    assert trainer_class(cfg) is PersonalizedTrainer
    objective, _ = build_objective("ppd", PPDConfig(beta=5000.0))
    out = objective(PairErrors(one(0.1000), one(0.1002), one(0.1001), one(0.1001)))
    assert out.loss.item() == pytest.approx(0.474077, abs=1e-6)
    assert out.metrics["rewards/accuracies"] == 1.0 and out.metrics["rewards/margins"] == pytest.approx(0.5)


@pytest.mark.parametrize("override, message", [
    ({"user_dropout": 1.0}, "objective.user_dropout: must be in [0, 1)"),
    ({"init": "ones"}, "objective.init: must be one of"),
    ({"num_examples": 0}, "objective.num_examples: must be >= 1"),
    ({"encoder": {"type": "resnet"}}, "objective.encoder.type: must be one of"),
    ({"beta": 0}, "objective.beta: must be > 0"),
])
def test_config_errors_name_the_key(override, message):
    from diffalign.training.config import ConfigError, parse_config

    cfg = {"model": "m", "dataset": "d", "output_dir": "o", "max_steps": 1, "objective": {"name": "ppd", **override}}
    with pytest.raises(ConfigError) as err:
        parse_config(cfg)
    assert message in str(err.value)


def test_config_defaults_and_encoder_defaults():
    from diffalign.training.config import parse_config

    cfg = parse_config({"model": "m", "dataset": "d", "output_dir": "o", "max_steps": 1, "objective": "ppd"})
    p = cfg.objective.params
    assert (p.num_examples, p.num_tokens, p.init, p.encoder.type) == (4, 4, "zero_v", "clip")
    assert p.encoder.model == "openai/clip-vit-large-patch14"
    assert cfg.to_dict()["objective"]["encoder"]["type"] == "clip"


@pytest.mark.parametrize("name", ["sd15_ppd.yaml", "toy_ppd.yaml"])
def test_shipped_ppd_configs_parse(name):
    from pathlib import Path

    from diffalign.training.config import load_config

    path = Path(__file__).resolve().parents[2] / "configs" / name
    assert path.read_text().startswith(f"# diffalign train configs/{name}")
    cfg = load_config(path)
    assert cfg.objective.name == "ppd" and cfg.max_steps > 0
    assert cfg.model.lora is None  # both: the paper's setting, the user branch trains and the base stays frozen
