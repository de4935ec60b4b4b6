"""Two real processes on CPU (``ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2``, gloo) on the toy world: the
ranks train on disjoint pairs, the logged loss is the mean over ranks, and a run killed after its second
checkpoint and resumed ends with the uninterrupted run's LoRA, bit for bit, each rank resuming its own random
state (before, every rank restored rank 0's generator and the ranks drew the same noise)."""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from diffalign.data import ResumableSampler
from fixtures.data import base_config
from diffalign.training import checkpoint as ckpt

TORCHRUN = shutil.which("torchrun")


def test_ranks_see_disjoint_pairs_that_cover_the_epoch():
    shards = [ResumableSampler(11, seed=3, epoch=2, rank=r, world_size=2).indices() for r in (0, 1)]
    assert not set(shards[0]) & set(shards[1]) and sorted(shards[0] + shards[1]) == list(range(11))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(cfg, *extra, kill_after_checkpoint=None):
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [TORCHRUN, "--nproc_per_node", "2", "--master_port", str(_free_port()), "-m", "diffalign.cli", "train",
           str(cfg), *extra]
    with open(cfg.with_suffix(".log"), "w+b") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        out = yaml.safe_load(cfg.read_text())["output_dir"]
        deadline = time.time() + 600
        while proc.poll() is None and time.time() < deadline:
            done = kill_after_checkpoint and ckpt.latest_checkpoint(Path(out) / "checkpoints")
            if done and done.name == f"checkpoint-{kill_after_checkpoint}":
                os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks
                proc.wait()
                return None
            time.sleep(0.05)
        proc.wait(timeout=60)
        log.seek(0)
        text = log.read().decode(errors="replace")
    assert proc.returncode == 0, text[-3000:]
    return text


@pytest.mark.slow
@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not on PATH")
def test_two_process_run_killed_and_resumed_equals_the_uninterrupted_run(tmp_path):
    from diffalign.toy import toy_model_path, toy_pairs_path

    kw = {"max_steps": 10, "checkpoint_every": 2, "batch_size": 2, "dataset.max_samples": 24,
          "dataset.random_flip": True, "objective": {"name": "dpo", "beta": 1000.0}}
    cfgs = {}
    for name in ("full", "killed"):
        cfgs[name] = tmp_path / f"{name}.yaml"
        cfgs[name].write_text(yaml.safe_dump(base_config(toy_model_path(), toy_pairs_path(), tmp_path / name, **kw)))
    log = _launch(cfgs["full"])
    assert "2 processes" in log and log.count("diffalign: done") == 1
    assert _launch(cfgs["killed"], kill_after_checkpoint=4) is None
    # killed as soon as checkpoint-4 is complete (on a slow machine a step or two later, never at checkpoint-8)
    assert ckpt.latest_checkpoint(tmp_path / "killed" / "checkpoints").name in ("checkpoint-4", "checkpoint-6")
    _launch(cfgs["killed"], "--resume")

    a = load_file(str(tmp_path / "full" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "killed" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = lambda d: [json.loads(x)["loss"] for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert losses(tmp_path / "full") == losses(tmp_path / "killed") and len(losses(tmp_path / "full")) == 10
    # checkpoint-8 was written after the resume: each rank had restored its own generator, so their states differ
    _, state = ckpt.load_checkpoint(tmp_path / "killed" / "checkpoints" / "checkpoint-8")
    ranks = state["ranks"]
    assert len(ranks) == 2 and not torch.equal(ranks[0]["rng"]["generator"], ranks[1]["rng"]["generator"])
    assert ranks[0]["position"] == ranks[1]["position"]


def _run_on_two_ranks(code: str, tmp_path):
    """Run ``code`` as a script on two gloo ranks (``sys.argv[1]`` = ``tmp_path``, where it writes its results)."""
    script = tmp_path / "two_ranks.py"
    script.write_text(code)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([TORCHRUN, "--nproc_per_node", "2", "--master_port", str(_free_port()), str(script),
                          str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


MEAN_OVER_RANKS = """
import json, sys
from accelerate import Accelerator
from diffalign.training.trainer import PreferenceTrainer

class Run:  # what _mean_over_ranks reads of a trainer
    accelerator = Accelerator()

rank = Run.accelerator.process_index
record = {"loss": 1.0 + 2 * rank, "rewards/accuracies": 0.25 * rank, "a": -rank}  # keys in no sorted order
logged = PreferenceTrainer._mean_over_ranks(Run(), record)
with open(f"{sys.argv[1]}/rank{rank}.json", "w") as f:  # a file per rank: their stdout lines interleave
    json.dump({"rank": rank, "logged": logged}, f)
Run.accelerator.wait_for_everyone()
Run.accelerator.end_training()  # tear the gloo group down before exit (a rank leaving early aborts the other)
"""


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not on PATH")
def test_logged_values_are_means_over_ranks(tmp_path):
    """Rank r logs loss 1 + 2r, accuracy r/4, a = -r: both ranks log the means (2.0, 0.125, -0.5) under the same
    keys."""
    _run_on_two_ranks(MEAN_OVER_RANKS, tmp_path)
    lines = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.json"))]
    assert sorted(ln["rank"] for ln in lines) == [0, 1]
    for ln in lines:
        assert ln["logged"] == {"loss": 2.0, "rewards/accuracies": 0.125, "a": -0.5}


ADVANTAGES_OVER_RANKS = """
import json, sys, types
import torch
from accelerate import Accelerator
from diffalign.training.online import GRPOTrainer, Rollout
from diffalign.training.config import RolloutConfig

class Run:  # what GRPOTrainer.advantages reads of a trainer
    accelerator = Accelerator()
    config = types.SimpleNamespace(rollout=RolloutConfig(prompts="unused"))

rank = Run.accelerator.process_index
prompts = [["a", "a", "b", "b"], ["c", "c", "a", "a"]][rank]  # prompt "a" is sampled on both ranks
rewards = torch.tensor([[1.0, 2.0, 0.0, 4.0], [3.0, 3.0, 5.0, 0.0]][rank])
samples = Rollout([], prompts, torch.zeros(4, 3, 2, 2), rewards=rewards)
GRPOTrainer.advantages(Run(), samples)
with open(f"{sys.argv[1]}/rank{rank}.json", "w") as f:
    json.dump({"rank": rank, "advantages": samples.advantages.tolist(), "tied": samples.record["zero_advantage_fraction"]}, f)
Run.accelerator.wait_for_everyone()
Run.accelerator.end_training()
"""


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not on PATH")
def test_grpo_advantages_are_normalised_over_the_ranks(tmp_path):
    """Each rank gets its rows of group_advantages over both ranks' rewards, grouped by prompt text across ranks
    (flow_grpo's stat tracker) and divided by the std of all 8 rewards."""
    from diffalign.online import group_advantages

    _run_on_two_ranks(ADVANTAGES_OVER_RANKS, tmp_path)
    got = {d["rank"]: d for d in (json.loads(p.read_text()) for p in tmp_path.glob("rank*.json"))}
    every = group_advantages(torch.tensor([1.0, 2.0, 0.0, 4.0, 3.0, 3.0, 5.0, 0.0]), list("aabbccaa"))
    assert got[0]["advantages"] == pytest.approx(every[:4].tolist(), abs=1e-6)
    assert got[1]["advantages"] == pytest.approx(every[4:].tolist(), abs=1e-6)
    # group "a" spans both ranks: mean (1 + 2 + 5 + 0) / 4 = 2; std of all eight rewards 1.7854
    assert got[0]["advantages"][0] == pytest.approx((1.0 - 2.0) / (np.std([1, 2, 0, 4, 3, 3, 5, 0]) + 1e-4), abs=1e-5)
    # A = 0 (left out of the loss): reward 2 sits on group a's mean; group c ties (3, 3)
    assert got[0]["tied"] == 0.25 and got[1]["tied"] == 0.5


@pytest.mark.slow
@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not on PATH")
def test_two_process_grpo_run(tmp_path):
    from diffalign.toy.demo import online_config

    cfg = tmp_path / "grpo.yaml"
    raw = online_config(tmp_path / "run", 0, "sd", "grpo", max_steps=2, batch_size=1, group_size=2,
                        num_inference_steps=3)
    cfg.write_text(yaml.safe_dump(raw))
    log = _launch(cfg)
    assert "2 processes" in log and log.count("diffalign: done") == 1
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(r["ratio/first_update_error"] <= 1e-5 for r in records)
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").exists()
