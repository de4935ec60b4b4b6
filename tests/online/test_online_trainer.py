"""The online recipes (``objective: grpo | nft``) on the two toy worlds: the first update is on-policy (ρ = 1 to
1e-5 in fp32, and the check fires when the sampler and the scored policy differ), tied groups do not train, the
NFT old policy follows its decay rule, a resumed run equals the uninterrupted one bit for bit, the monitor's
actions, the LoRA export, and the one-line errors."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffalign.likelihood import noisy_sample_and_target, x0_coefficients
from diffalign.online import Rewards
from diffalign.toy.demo import online_config
from diffalign.training.config import apply_overrides, parse_config
from diffalign.training.online import GRPOTrainer, NFTTrainer
from diffalign.training.trainer import trainer_class

SMALL = {"max_steps": 2, "batch_size": 2, "group_size": 4, "num_inference_steps": 4}


def _config(tmp_path, world="sd", objective="grpo", name="run", overrides=(), **kw):
    raw = online_config(tmp_path / name, 0, world, objective, **{**SMALL, **kw})
    return parse_config(apply_overrides(raw, list(overrides)))


def _train(cfg, resume=False):
    trainer = trainer_class(cfg)(cfg).setup(resume=resume, overwrite=not resume)
    trainer.train()
    trainer.cleanup()
    return trainer


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_recipes_are_the_online_trainers(tmp_path):
    assert trainer_class(_config(tmp_path, objective="grpo")) is GRPOTrainer
    assert trainer_class(_config(tmp_path, objective="nft")) is NFTTrainer


@pytest.mark.parametrize("world", ["sd", "flow"])
def test_first_update_is_on_policy_and_the_second_is_not(tmp_path, world):
    """Two updates per rollout: every step's first update re-scores the sampling policy (|ρ - 1| <= 1e-5 in
    fp32); the second comes after an optimizer step, so its ratios have moved (the clip acts there)."""
    cfg = _config(tmp_path, world, updates_per_rollout=2, learning_rate=1e-2)
    trainer = _train(cfg)
    assert len(trainer.history) == 2 and trainer.updates == 4
    from diffalign.inference import load_pipeline  # the export is a LoRA the world's pipeline loads

    assert load_pipeline(str(cfg.model.pretrained), str(tmp_path / "run"), device="cpu") is not None
    for record in trainer.history:
        assert record["ratio/first_update_error"] <= 1e-5
        assert record["ratio_max"] - record["ratio_min"] > 1e-4  # mean over the items of both updates
        assert record["reward"] > 0 and 0 <= record["zero_advantage_fraction"] < 1
        assert {"time/sample", "time/score", "time/train", "artefact/saturation", "monitor/flagged"} <= set(record)


def test_ratio_check_warns_when_the_scored_policy_is_not_the_sampler(tmp_path, capsys):
    """LoRA dropout is off while sampling (eval) and on while re-scoring (train): once the adapters are non-zero
    (step 2; at step 1 B = 0 and dropout changes nothing) the first ratio is off 1, and the trainer says so once."""
    cfg = _config(tmp_path, "sd", overrides=["model.lora.dropout=0.5"], updates_per_rollout=1)
    trainer = _train(cfg)
    errors = [h["ratio/first_update_error"] for h in trainer.history]
    assert errors[0] <= 1e-5 < cfg.rollout.ratio_tolerance < errors[1]
    assert capsys.readouterr().out.count("the first update's importance ratio is off 1") == 1


class _Constant:
    def score(self, images, prompts):
        return torch.ones(len(images))


def test_a_step_whose_groups_all_tie_leaves_the_weights_unchanged(tmp_path):
    cfg = _config(tmp_path, "sd", max_steps=1, overrides=["objective.kl_beta=0", "optimizer.weight_decay=0"])
    trainer = trainer_class(cfg)(cfg).setup(overwrite=True)
    trainer.rewards = Rewards("toy", scorers={"toy": _Constant()})
    before = {k: v.clone() for k, v in trainer.trainable_state().items()}
    trainer.train()
    assert trainer.history[0]["zero_advantage_fraction"] == 1.0
    after = trainer.trainable_state()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # the same step with the oracle's rewards moves them
    cfg2 = _config(tmp_path, "sd", name="moving", max_steps=1, overrides=["objective.kl_beta=0"])
    trainer2 = _train(cfg2)
    assert any(not torch.equal(before[k], v) for k, v in trainer2.trainable_state().items())


def test_nft_old_policy_follows_its_decay_rule(tmp_path):
    """After a step, old = d·old + (1-d)·θ with d = min(rate · updates, max)."""
    cfg = _config(tmp_path, "flow", "nft", max_steps=1,
                  overrides=["objective.old_decay_rate=0.3", "objective.old_decay_max=0.9"])
    trainer = trainer_class(cfg)(cfg).setup(overwrite=True)
    old0 = {k: v.clone() for k, v in trainer.old_state.items()}
    trainer.train()
    d = 0.3 * trainer.updates
    for k, theta in trainer.trainable_state().items():
        torch.testing.assert_close(trainer.old_state[k], d * old0[k] + (1 - d) * theta, rtol=0, atol=1e-7)
    assert any(not torch.equal(old0[k], trainer.old_state[k]) for k in old0)


@pytest.mark.parametrize("objective,world", [("grpo", "sd"), ("nft", "flow")])
def test_resumed_run_equals_the_uninterrupted_one(tmp_path, objective, world):
    full = _train(_config(tmp_path, world, objective, name="full", max_steps=4))
    _train(_config(tmp_path, world, objective, name="cut", max_steps=3, overrides=["checkpoint_every=2"]))
    resumed = _train(_config(tmp_path, world, objective, name="cut", max_steps=4), resume=True)
    a = load_file(str(tmp_path / "full" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "cut" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert full.monitor.state_dict() == resumed.monitor.state_dict()
    assert [h["reward"] for h in full.history[2:]] == [h["reward"] for h in resumed.history]


def test_monitor_stop_checkpoints_and_ends_the_run(tmp_path, capsys):
    cfg = _config(tmp_path, "sd", max_steps=50,
                  overrides=["monitor.action=stop", "monitor.window=1", "monitor.patience=1",
                             "monitor.artefacts=off", "monitor.units=absolute", "monitor.min_rise=0",
                             "monitor.min_fall=0", "monitor.prompts=null"], reward="brightness", held_out="toy")
    trainer = trainer_class(cfg)(cfg).setup(overwrite=True)
    for step, (reward, held) in enumerate([(0.1, 1.0), (0.2, 0.9), (0.3, 0.8)], start=1):
        trainer.step = step
        trainer.on_record({"reward": reward, "heldout/toy": held})
    assert trainer.stop_reason and "heldout/toy" in trainer.stop_reason
    assert (tmp_path / "run" / "checkpoints" / "checkpoint-2").is_dir()
    assert "reward hacking suspected" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["flow", "epsilon", "v_prediction"])
def test_x0_coefficients_invert_the_forward_process(kind):
    """x̂0 = a x_t - b o recovers x0 when o is the exact regression target."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    sched = (FlowMatchEulerDiscreteScheduler(shift=3.0) if kind == "flow"
             else DDPMScheduler(prediction_type=kind))
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(5, 4, 8, 8, generator=g), torch.randn(5, 4, 8, 8, generator=g)
    t = sched.timesteps[[1, 50, 200, 500, 900]] if kind == "flow" else torch.tensor([1, 50, 200, 500, 900])
    x_t, target = noisy_sample_and_target(sched, x0, noise, t)
    a, b = x0_coefficients(sched, t, x0.ndim)
    torch.testing.assert_close(a * x_t - b * target, x0, rtol=0, atol=2e-4)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "diffalign.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}, timeout=300)


@pytest.mark.parametrize("override,message", [
    (["gradient_accumulation_steps=2"], "gradient_accumulation_steps: online objectives"),
    (["rollout.group_size=1"], "rollout.group_size: must be >= 2"),
    (["rollout.rewards=pickscor"], "rollout.rewards:"),
    (["rollout.prompts=null"], "rollout.prompts: is required for objective grpo"),
    (["monitor.action=halt"], "monitor.action: must be warn, checkpoint or stop"),
])
def test_bad_online_configs_are_one_line_config_errors(tmp_path, override, message):
    from diffalign.training.config import ConfigError

    with pytest.raises(ConfigError) as err:
        _config(tmp_path, overrides=override)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_online_setup_errors_stop_the_cli_with_one_line(tmp_path):
    """NFT without LoRA and a missing prompts file (before any model loads); reward weights that are not on the
    machine (offline)."""
    import yaml

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(online_config(tmp_path / "run", 0, "sd", "grpo", **SMALL)))
    for override, message in ((["objective.name=nft", "model.lora=null"], "config error: model.lora: DiffusionNFT"),
                              (["rollout.prompts=/nonexistent/prompts.txt"],
                               "error: rollout.prompts: '/nonexistent/prompts.txt' is not a file"),
                              (["rollout.rewards=imagereward"], "error: "),  # offline, no local weights
                              ):
        out = _cli("train", str(path), *override)
        lines = [ln for ln in out.stderr.strip().splitlines() if ln.startswith("diffalign")]
        assert out.returncode == 2 and len(lines) == 1, out.stderr[-2000:]
        assert lines[0].startswith(f"diffalign: {message}"), out.stderr[-2000:]


@pytest.mark.parametrize("family,objective", [("sdxl", "grpo"), ("flux", "grpo"), ("sdxl", "nft"), ("flux", "nft")])
def test_sdxl_and_flux_train_online(tmp_path, family, objective):
    """SDXL (time ids, two text encoders) and FLUX (no CFG: the guidance input; packed tokens) on tiny random
    components: a step runs, the first GRPO update is on-policy, the LoRA moves."""
    from fixtures.tiny_flow import tiny_flow_components
    from fixtures.tiny_models import tiny_components

    components = tiny_flow_components(family) if family == "flux" else tiny_components(family)
    raw = online_config(tmp_path / "run", 0, "sd", objective, max_steps=1, batch_size=1, group_size=2,
                        num_inference_steps=3)
    raw["model"]["pretrained"] = "tiny"
    raw["rollout"]["rewards"], raw["monitor"]["held_out"] = "brightness", None
    raw["dataset"]["resolution"] = 32  # the fixtures' native sizes (flux: 256 px) only cost time here
    cfg = parse_config(raw)
    trainer = trainer_class(cfg)(cfg, components).setup(overwrite=True)
    before = {k: v.clone() for k, v in trainer.trainable_state().items()}
    trainer.train()
    record = trainer.history[0]
    assert np.isfinite(record["loss"]) and record.get("ratio/first_update_error", 0.0) <= 1e-5
    assert any(not torch.equal(before[k], v) for k, v in trainer.trainable_state().items())


def test_fixed_evaluation_set_is_repeatable_and_leaves_training_alone(tmp_path):
    """monitor.prompts: the same images at every evaluation of the same weights (fixed noise), eval/ keys on the
    due steps, the monitor watching them, and the trained LoRA identical to a run without evaluations."""
    prompts = tmp_path / "eval.txt"
    prompts.write_text("a red circle on a blue background\n# a comment\n\na green square on a white background\n")
    common = ["monitor.held_out=brightness", "monitor.artefacts=watch"]
    with_eval = _config(tmp_path, "sd", name="eval", max_steps=3,
                        overrides=[*common, f"monitor.prompts={prompts}", "monitor.every=2"])
    trainer = _train(with_eval)
    assert trainer.monitor.train_metric == "eval/reward" and "eval/heldout/brightness" in trainer.monitor.directions
    assert [h["step"] for h in trainer.history if "eval/reward" in h] == [1, 2]
    first, again = trainer.evaluate(), trainer.evaluate()
    assert first == again and set(first) >= {"eval/reward", "eval/heldout/brightness", "eval/artefact/grid"}
    plain = _train(_config(tmp_path, "sd", name="plain", max_steps=3, overrides=common))
    a, b = trainer.trainable_state(), plain.trainable_state()
    assert all(torch.equal(a[k], b[k]) for k in a)
