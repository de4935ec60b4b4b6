"""``diffalign robot`` CLI and the shipped configs (tiny sizes, seconds)."""

import json
from pathlib import Path

import pytest

from diffalign.robot.cli import build_experiment_config, load_config, main

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs" / "robot").glob("*.yaml"))
TINY = [
    "experiment.n_demos=64", "experiment.bc_steps=20", "experiment.bc_batch_size=16", "experiment.n_eval=8",
    "experiment.n_pref_states=8", "experiment.deformpam.steps=2", "experiment.deformpam.n_draws=2",
    "experiment.policy.hidden_dim=16", "experiment.policy.num_inference_steps=2", "experiment.ras_ns=[1,2]",
    "experiment.n_triplets=4", "experiment.triplet_gap=0.0", "experiment.rapl.epochs=1", "experiment.n_rho_eval=8",
    "experiment.rapl_pref_states=4", "experiment.rapl_rollouts=2", "experiment.rapl.sinkhorn_iters=5",
]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_instantiates(path):
    cfg = load_config(path)
    exp = build_experiment_config(cfg)
    assert exp.policy.horizon == 8
    assert path.read_text().startswith(f"# diffalign robot train configs/robot/{path.name}")


def test_overrides_and_validation(tmp_path):
    cfg = load_config(CONFIGS[0], ["experiment.deformpam.beta=50", "head=rapl"])
    assert cfg["experiment"]["deformpam"]["beta"] == 50 and cfg["head"] == "rapl"
    bad = tmp_path / "bad.yaml"
    bad.write_text("head: cpl\noutput_dir: x\n")
    with pytest.raises(ValueError, match="`head` must be one of"):
        load_config(bad)
    assert main(["train", str(bad)]) == 2


@pytest.mark.parametrize("name", ["detour2d_deformpam.yaml", "detour2d_rapl.yaml"])
def test_train_then_eval(tmp_path, name, capsys):
    out = tmp_path / "run"
    assert main(["train", str(CONFIGS[0].parent / name), f"output_dir={out}", *TINY]) == 0
    assert (out / "imitation" / "policy.safetensors").exists() and (out / "aligned").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert "aligned" in metrics
    if name == "detour2d_rapl.yaml":
        assert (out / "rapl_encoder.safetensors").exists() and "rho_rapl" in metrics
    assert main(["train", str(CONFIGS[0].parent / name), f"output_dir={out}", *TINY]) == 2  # refuses to overwrite
    assert main(["eval", str(out), "--ras-n", "1,2"]) == 0
    printed = capsys.readouterr().out
    assert "RAS N=2" in printed and "oracle best-of-2" in printed
    result = json.loads((out / "eval.json").read_text())
    assert result["ras"]["1"] == result["imitation"]  # N = 1 is the imitation policy's own sample


def test_overrides_are_typed_like_train_overrides():
    """`experiment.deformpam.lr=1e-4` (YAML reads 1e-4 as a string) reaches the optimizer as the float 1e-4, the
    toy's other defaults stay, and an unknown key is one config error naming it."""
    from diffalign.training.config import ConfigError

    exp = build_experiment_config(load_config(CONFIGS[0], ["experiment.deformpam.lr=1e-4",
                                                           "experiment.triplet_gap=5e-1"]))
    assert exp.deformpam.lr == 1e-4 and isinstance(exp.deformpam.lr, float) and exp.triplet_gap == 0.5
    assert exp.deformpam.n_draws == 32  # the toy's default, not the library's
    with pytest.raises(ConfigError, match="experiment.deformpam.lrr: unknown key"):
        build_experiment_config(load_config(CONFIGS[0], ["experiment.deformpam.lrr=1"]))


def test_top_level_dispatch():
    from diffalign.cli import main as top

    with pytest.raises(SystemExit):
        top(["robot", "--help"])
