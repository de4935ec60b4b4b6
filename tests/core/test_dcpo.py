import math
import random

import pytest
import torch

from diffalign.data.captions import CaptionPerturber
from diffalign.objectives import PairErrors, build_objective
from diffalign.testing import base_config
from diffalign.training.config import ConfigError, parse_config
from diffalign.training.trainer import PreferenceTrainer


def test_dcpo_loss_by_hand():
    """β=500: inside = -250·[(0.10-0.11) - (0.12-0.11)] = 5 -> loss = log(1 + e^-5) = 0.0067153."""
    obj, spec = build_objective("dcpo")
    assert spec.dual_captions and spec.needs_reference
    d = torch.float64
    e = PairErrors(torch.tensor([0.10], dtype=d), torch.tensor([0.12], dtype=d),
                   torch.tensor([0.11], dtype=d), torch.tensor([0.11], dtype=d))
    assert obj(e).loss.item() == pytest.approx(math.log1p(math.exp(-5.0)), abs=1e-9)
    mw = e.model_w.clone().requires_grad_()
    obj(PairErrors(mw, e.model_l, e.ref_w, e.ref_l)).loss.backward()
    assert mw.grad.item() > 0


def test_perturber_changes_same_class_words_deterministically():
    p = CaptionPerturber("weak", vocabulary=["dog", "tree"])
    c = "a red circle on a blue background"
    out1, out2 = p(c, random.Random(3)), p(c, random.Random(3))
    assert out1 == out2 and out1 != c
    words_in, words_out = c.split(), out1.split()
    assert len(words_in) == len(words_out)
    for a, b in zip(words_in, words_out):
        if a != b and a in ("red", "blue"):
            assert b in p.classes["colour"]
        if a != b and a == "circle":
            assert b in p.classes["shape"]
    strong = CaptionPerturber("strong", vocabulary=["dog"])
    changed = lambda q: sum(x != y for x, y in zip(c.split(), q(c, random.Random(0)).split()))
    assert changed(strong) >= changed(p)


def test_trainer_conditions_loser_on_its_own_caption(tiny_sd15_dir, pickapic_dir, tmp_path):
    cfg = parse_config(base_config(tiny_sd15_dir, pickapic_dir, tmp_path / "run", max_steps=2,
                                   checkpoint_every=None, objective={"name": "dcpo", "loser_caption": "perturb"}))
    tr = PreferenceTrainer(cfg).setup()
    seen = []
    tr.accelerator.unwrap_model(tr.unet).register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((torch.is_grad_enabled(), kwargs["encoder_hidden_states"].clone())),
        with_kwargs=True)
    tr.train()
    assert [g for g, _ in seen] == [True, False, True, False]  # one policy + one reference call per step
    h = seen[0][1]  # (2B, L, D): winners under z_w, losers under z_l
    assert not torch.allclose(h[:2], h[2:])
    assert torch.equal(seen[0][1], seen[1][1])  # the reference sees the same dual captions
    tr.cleanup()


def test_column_mode_needs_caption_columns(tiny_sd15_dir, pickapic_dir, tmp_path):
    from diffalign.data import DatasetFormatError

    cfg = parse_config(base_config(tiny_sd15_dir, pickapic_dir, tmp_path / "run",
                                   objective={"name": "dcpo", "loser_caption": "column"}))
    with pytest.raises(DatasetFormatError, match="caption_chosen"):
        PreferenceTrainer(cfg).setup()
    with pytest.raises(ConfigError, match="objective.loser_caption"):
        parse_config(base_config(tiny_sd15_dir, pickapic_dir, tmp_path / "r", objective={"name": "dcpo",
                                                                                        "loser_caption": "x"}))
