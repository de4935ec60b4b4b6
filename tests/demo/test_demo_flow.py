"""``diffalign demo --world flow``: the demo's config trains LoRA Flow-DPO on the shipped toy flow world, and
the exported LoRA gives the trained policy's images through the loaded pipeline. (The full demo, 150 steps and 96
held-out images, takes 1-2 min on one thread: its figures are the dpo rows of docs/objectives.md.)"""

import math

import numpy as np
import pytest
import torch

from diffalign import toy

MODEL = toy.toy_flow_path()
pytestmark = pytest.mark.skipif(not (toy.toy_flow_pairs_path() / "pairs_report.json").exists(),
                                reason="assets/toy-flow-pairs not built")


def test_flow_demo_config_trains_flow_dpo_on_toy_flow(tmp_path):
    from diffalign.inference import load_pipeline
    from diffalign.toy.demo import FLOW_DEMO_DEFAULTS, demo_config
    from diffalign.training.config import parse_config
    from diffalign.training.trainer import PreferenceTrainer

    cfg = demo_config(tmp_path / "run", seed=0, world="flow", max_steps=3)
    assert cfg["model"]["pretrained"] == str(MODEL) and cfg["model"]["lora"]["target_modules"] is None
    assert cfg["objective"] == {"name": "dpo", "beta": FLOW_DEMO_DEFAULTS["beta"]}
    tr = PreferenceTrainer(parse_config(cfg)).setup()
    assert tr.components.family == "sd3"
    tr.train()
    assert tr.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    policy = tr.accelerator.unwrap_model(tr.unet).eval()
    tr.cleanup()

    prompts, seeds = toy.heldout_prompts()[:2], [1, 2]
    own = load_pipeline(str(MODEL), device="cpu")
    own.transformer = policy  # the trained policy itself
    pipe = load_pipeline(str(MODEL), str(tmp_path / "run"), device="cpu")
    ours, theirs = toy.generate(own, prompts, seeds, num_inference_steps=4), toy.generate(
        pipe, prompts, seeds, num_inference_steps=4)
    for a, b in zip(ours, theirs, strict=True):
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1
    # and the LoRA is not a no-op: the loaded transformer differs from the base one
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    kw = {"hidden_states": x, "timestep": torch.tensor([500.0]), "return_dict": False,
          "encoder_hidden_states": torch.randn(1, 16 + 77, 48), "pooled_projections": torch.randn(1, 48)}
    with torch.no_grad():
        tuned, trained = pipe.transformer(**kw)[0], policy(**kw)[0]
        pipe.transformer.disable_lora()
        base = pipe.transformer(**kw)[0]
    torch.testing.assert_close(tuned, trained, atol=1e-5, rtol=1e-5)
    assert (tuned - base).abs().max() > 1e-5


def test_unknown_world_is_one_line():
    from diffalign.toy.demo import demo_config

    with pytest.raises(ValueError, match="world must be one of") as err:
        demo_config("out", world="dit")
    assert "\n" not in str(err.value)
