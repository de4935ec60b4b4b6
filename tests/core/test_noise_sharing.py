"""The recipes hand the likelihood layer one (t, ε) per pair when ``share_noise`` is on (the official code's
variance reduction) and independent draws when it is off, for the DPO recipe and SePPO's semi-policy recipe
(which replaces the inputs step, not the noise step)."""

import pytest
import torch

from fixtures.data import base_config
from diffalign.training import trainer
from diffalign.training.config import parse_config
from diffalign.training.trainer import trainer_class

SEPPO = {"name": "seppo", "snapshot_every": 1, "max_snapshots": 2, "sampling_steps": 1, "guidance_scale": 1.0}


@pytest.mark.parametrize("objective", ["dpo", SEPPO], ids=["dpo", "seppo"])
@pytest.mark.parametrize("share", [True, False])
def test_recipe_shares_t_and_noise_within_a_pair(objective, share, tiny_sd15_dir, pickapic_dir, tmp_path,
                                                  monkeypatch):
    seen = []
    original = trainer.preference_errors

    def spy(*args, t=None, noise=None, **kwargs):
        seen.append((t.clone(), noise.clone()))
        return original(*args, t=t, noise=noise, **kwargs)

    monkeypatch.setattr(trainer, "preference_errors", spy)
    cfg = parse_config(base_config(tiny_sd15_dir, pickapic_dir, tmp_path / "run", max_steps=2, checkpoint_every=None,
                                   objective=objective, share_noise=share))
    tr = trainer_class(cfg)(cfg).setup()
    tr.train()
    tr.cleanup()
    assert len(seen) == 2
    for t, noise in seen:
        b = t.shape[0] // 2
        assert noise.shape[0] == 2 * b
        assert torch.equal(t[:b], t[b:]) == share
        assert torch.equal(noise[:b], noise[b:]) == share
