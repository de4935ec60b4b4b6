"""The README's first command, end to end on the shipped toy world: Diffusion-DPO must beat the base model on
held-out prompts by a margin that a broken loss does not reach.

To see the test catch a broken loss, run it with ``DIFFALIGN_LOSS_MUTATION=flip`` (the loss's sign flipped) or
``=zero`` (the loss multiplied by 0): both fail the margin assertion.
"""

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffalign.cli import main
from diffalign.objectives import ObjectiveOutput, PairErrors, dpo_logits, dpo_metrics, register_objective
from diffalign.objectives.dpo import DPOConfig

MUTATION = os.environ.get("DIFFALIGN_LOSS_MUTATION")
if MUTATION:
    @register_objective(f"dpo-{MUTATION}", DPOConfig, needs_reference=True)
    def _mutated(config):
        def objective(e: PairErrors) -> ObjectiveOutput:
            logits = dpo_logits(e.model_w, e.model_l, e.ref_w, e.ref_l, config.beta)
            losses = -F.logsigmoid(logits)
            losses = -losses if MUTATION == "flip" else 0 * losses
            return ObjectiveOutput(losses.mean(), losses, dpo_metrics(logits, e))
        return objective


@pytest.mark.slow
def test_demo_aligns_the_toy_model(tmp_path, capsys):
    out = tmp_path / "demo"
    if MUTATION:
        from diffalign.toy.demo import run_demo

        from diffalign.toy.demo import DEMO_DEFAULTS

        report = run_demo(out, seed=0, objective={"name": f"dpo-{MUTATION}", "beta": DEMO_DEFAULTS["beta"]})
    else:
        assert main(["demo", "--out", str(out), "--seed", "0"]) == 0
        printed = capsys.readouterr().out
        assert "win rate" in printed and "aligned reward" in printed
        report = json.loads((out / "report.json").read_text())
    for key in ("base_reward", "aligned_reward", "win_rate", "lora_path"):
        assert key in report
    assert (out / "samples.png").exists() and (out / "curves.png").exists()
    per = report["per_image"]
    gain = np.array([p["aligned"] - p["base"] for p in per])
    # Margin: the aligned model wins on >= 65 % of the 24 held-out images and its mean reward gain exceeds twice its
    # standard error. Measured with scripts/compare_objectives.py (docs/objectives.md), seeds 0 / 1 / 2: win rate
    # 75 % / 67 % / 75 %, gain +0.099 ± 0.042 / +0.057 ± 0.016 / +0.068 ± 0.026; this test runs seed 0. With the
    # loss's sign flipped the win rate is 21 %, with the loss zeroed 50 % (DIFFALIGN_LOSS_MUTATION=flip|zero).
    se = gain.std(ddof=1) / np.sqrt(len(gain))
    assert report["win_rate"] >= 0.65, report["win_rate"]
    assert gain.mean() > 2 * se, (gain.mean(), se)


@pytest.mark.slow
def test_exported_lora_reproduces_the_aligned_images(tmp_path):
    """load_lora_weights into the shipped pipeline == the trained policy's own images."""
    from diffusers import StableDiffusionPipeline

    from diffalign import toy
    from diffalign.toy.demo import demo_config
    from diffalign.training.config import parse_config
    from diffalign.training.trainer import PreferenceTrainer

    tr = PreferenceTrainer(parse_config(demo_config(tmp_path / "run", seed=0, max_steps=20))).setup()
    tr.train()
    prompts = toy.heldout_prompts()[:3]
    own = StableDiffusionPipeline.from_pretrained(str(toy.toy_model_path()))
    own.unet = tr.accelerator.unwrap_model(tr.unet).eval()  # the trained policy itself, same scheduler and VAE
    own.set_progress_bar_config(disable=True)
    ours = toy.generate(own, prompts, [1, 2, 3])
    pipe = StableDiffusionPipeline.from_pretrained(str(toy.toy_model_path()))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(tmp_path / "run"))
    theirs = toy.generate(pipe, prompts, [1, 2, 3])
    for a, b in zip(ours, theirs, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))  # same U-Net weights, same computation: bit-exact
