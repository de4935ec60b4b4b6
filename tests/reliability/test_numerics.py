"""NaN/inf loss or gradients: the step is skipped and counted; K in a row stop the run with a good checkpoint."""

import math

import pytest
import torch

from fixtures.data import base_config
from diffalign.training import checkpoint as ckpt
from diffalign.training.config import parse_config
from diffalign.training.trainer import NonFiniteError, PreferenceTrainer


def trainer(model, data, out, **kw):
    return PreferenceTrainer(parse_config(base_config(model, data, out, **kw))).setup()


def inject(tr, bad_calls: set[int], kind: str):
    original, calls = tr.compute_loss, {"n": 0}

    def compute_loss(batch):
        out = original(batch)
        calls["n"] += 1
        if calls["n"] in bad_calls:
            if kind == "loss":
                out.loss = out.loss * float("nan")
            else:  # a finite loss whose gradient is NaN
                p = next(p for p in tr.unet.parameters() if p.requires_grad)
                handle = {}

                def poison(g):  # one backward pass only
                    handle["h"].remove()
                    return torch.full_like(g, float("nan"))

                handle["h"] = p.register_hook(poison)
        return out

    tr.compute_loss = compute_loss


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_nonfinite_steps_are_skipped_and_counted(kind, tiny_sd15_dir, pickapic_dir, tmp_path):
    tr = trainer(tiny_sd15_dir, pickapic_dir, tmp_path / "run", max_steps=4, checkpoint_every=None)
    inject(tr, {2}, kind)
    before = {n: p.detach().clone() for n, p in tr.trainable_state().items()}
    summary = tr.train()
    assert summary["steps"] == 4 and summary["nonfinite_steps_skipped"] == 1
    after = tr.trainable_state()
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[n], after[n]) for n in before)  # the good steps did train
    assert all(math.isfinite(h["loss"]) for h in tr.history)


def test_consecutive_nonfinite_steps_stop_with_last_good_checkpoint(tiny_sd15_dir, pickapic_dir, tmp_path):
    tr = trainer(tiny_sd15_dir, pickapic_dir, tmp_path / "run", max_steps=10, checkpoint_every=None,
                 max_nonfinite_steps=3)
    inject(tr, {3, 4, 5}, "loss")
    with pytest.raises(NonFiniteError, match="3 non-finite steps in a row at step 2"):
        tr.train()
    last = ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert last is not None and last.name == "checkpoint-2"
    weights, _ = ckpt.load_checkpoint(last)
    assert all(torch.isfinite(v).all() for v in weights.values())
