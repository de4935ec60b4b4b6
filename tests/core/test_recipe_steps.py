"""The training loop calls named steps only (``inputs`` -> ``noise`` -> ``errors`` inside ``compute_loss``, inside
``training_step``), recipes are picked by objective, and fp16's loss scale survives a resume."""

import accelerate
import pytest
import torch

from diffalign.training.config import parse_config
from diffalign.training.inpo import InversionTrainer
from diffalign.training.trainer import PreferenceTrainer, trainer_class
from fixtures.data import base_config


@pytest.mark.filterwarnings(r"ignore:Seems like `optimizer.step\(\)` has been overridden")
def test_loop_calls_the_named_steps_once_per_micro_batch(tiny_sd15_dir, pickapic_dir, tmp_path, monkeypatch):
    """2 optimizer steps x 2 accumulated micro-batches: 4 training_steps, each one inputs/noise/errors in that order,
    and the optimizer updates twice (once per window)."""
    cfg = parse_config(base_config(tiny_sd15_dir, pickapic_dir, tmp_path / "run", max_steps=2, batch_size=1,
                                   gradient_accumulation_steps=2, checkpoint_every=None))
    tr = PreferenceTrainer(cfg).setup()
    calls = []
    for name in ("training_step", "inputs", "noise", "errors"):
        original = getattr(tr, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(tr, name, spy)
    updates, optimizer_step = [], tr.optimizer.step
    monkeypatch.setattr(tr.optimizer, "step", lambda *a, **k: (updates.append(tr.step), optimizer_step(*a, **k)))
    tr.train()
    tr.cleanup()
    assert calls == ["training_step", "inputs", "noise", "errors"] * 4
    assert updates == [0, 1]


def test_a_recipe_objective_refuses_the_plain_trainer(tiny_sd15_dir, pickapic_dir, tmp_path):
    """InPO's (t, ε) come from its recipe's noise step: the plain trainer would silently train Diffusion-DPO."""
    cfg = parse_config(base_config(tiny_sd15_dir, pickapic_dir, tmp_path / "run", objective="inpo"))
    assert trainer_class(cfg) is InversionTrainer
    with pytest.raises(TypeError, match="trains with diffalign.training.inpo.InversionTrainer"):
        PreferenceTrainer(cfg).setup()


class _ScaledAccelerator(accelerate.Accelerator):
    """fp16's GradScaler on the CPU (accelerate makes one only on GPUs): scale 2^10, doubled after every step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1)


def test_grad_scaler_state_is_checkpointed_and_restored(tiny_sd15_dir, pickapic_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(accelerate, "Accelerator", _ScaledAccelerator)
    run = tmp_path / "run"
    cfg = parse_config(base_config(tiny_sd15_dir, pickapic_dir, run, max_steps=3, checkpoint_every=2))
    tr = PreferenceTrainer(cfg).setup()
    tr.train()
    final_scale = tr.accelerator.scaler.get_scale()
    tr.cleanup()
    assert final_scale == 2.0 ** 13  # three finite steps, each doubling the scale
    # resume from checkpoint-2 (the scale was 2^12 there); the resumed run's fresh scaler starts at 2^10
    (run / "summary.json").unlink()
    resumed = PreferenceTrainer(parse_config(base_config(tiny_sd15_dir, pickapic_dir, run, max_steps=3,
                                                         checkpoint_every=2))).setup(resume=True)
    assert resumed.step == 2
    assert resumed.accelerator.scaler.get_scale() == 2.0 ** 12
    resumed.train()
    assert resumed.accelerator.scaler.get_scale() == final_scale
    resumed.cleanup()


def test_sharded_launches_stop_with_one_line():
    """FSDP/DeepSpeed would save and export shards as if they were whole weights: refused before anything loads."""
    from accelerate.utils import DistributedType

    from diffalign.training.trainer import LaunchError, _check_sharding

    for ok in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        _check_sharding(ok)
    for sharded in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        with pytest.raises(LaunchError, match="not supported yet") as err:
            _check_sharding(sharded)
        assert "\n" not in str(err.value)


def test_validation_grid_on_a_unet(tiny_sd15_dir, pickapic_dir, tmp_path):
    from PIL import Image

    cfg = parse_config(base_config(tiny_sd15_dir, pickapic_dir, tmp_path / "run", max_steps=2, checkpoint_every=None,
                                   **{"validation.every": 1, "validation.prompts": ["a red circle", "a cat"],
                                      "validation.num_inference_steps": 2}))
    tr = PreferenceTrainer(cfg).setup()
    tr.train()
    tr.cleanup()
    for step in (1, 2):
        grid = Image.open(tmp_path / "run" / "validation" / f"step-{step:06d}.png")
        assert grid.size == (2 * (32 + 2) + 2, 32 + 2 + 2)
