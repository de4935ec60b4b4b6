"""SIGKILL a training process at random steps (once mid-checkpoint-write) and resume until it finishes: the final
weights, the EMA weights and the logged loss curve equal an uninterrupted run's, bit for bit. Runs on the toy world
(``assets/toy-sd`` + ``assets/toy-pairs``) with random flips, the latent cache, EMA and a cosine schedule on, so the
data-loader position, RNG states, optimizer, scheduler, EMA and cache all have to come back."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fixtures.data import base_config
from diffalign.training import checkpoint as ckpt

CMD = [sys.executable, "-m", "diffalign.cli", "train"]
CRASH_AT = Path(__file__).resolve().parents[1] / "fixtures" / "crash_at.py"  # the CLI, killed at a set point


def logged_steps(out_dir) -> int:
    path = out_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def run(cfg_path, *extra, crash_at=None, kill_at_step=None, out_dir=None):
    """Run ``diffalign train``; with ``kill_at_step``, SIGKILL it as soon as that many steps are logged; with
    ``crash_at`` (``checkpoint:4``), it kills itself there (``fixtures/crash_at.py``)."""
    cmd = [sys.executable, str(CRASH_AT), crash_at, "--", "train"] if crash_at else CMD
    log = open(cfg_path.with_suffix(".log"), "w+b")
    proc = subprocess.Popen([*cmd, str(cfg_path), *extra], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline:
        if kill_at_step is not None and logged_steps(out_dir) >= kill_at_step:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    log.seek(0)
    return proc.returncode, log.read().decode(errors="replace")


def losses(out_dir):
    return [json.loads(x)["loss"] for x in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["dpo", "seppo"])
def test_sigkill_and_resume_is_bit_identical(objective, tmp_path):
    from diffalign.toy import toy_model_path, toy_pairs_path

    obj = "dpo" if objective == "dpo" else {"name": "seppo", "snapshot_every": 2, "max_snapshots": 3,
                                            "sampling_steps": 2, "guidance_scale": 2.0}
    max_steps = 8
    kw = {"max_steps": max_steps, "checkpoint_every": 2, "keep_last_checkpoints": 2, "objective": obj,
          "batch_size": 4, "ema_decay": 0.9, "dataset.random_flip": True, "dataset.max_samples": 12,  # ~3 epochs in 8 steps: the cache is hit after a resume
          "dataset.cache_dir": str(tmp_path / "cache"),
          "optimizer.lr_scheduler": "cosine", "optimizer.warmup_steps": 2}
    for name in ("ref", "killed"):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(base_config(toy_model_path(), toy_pairs_path(),
                                                                          tmp_path / name, **kw)))
    code, out = run(tmp_path / "ref.yaml")
    assert code == 0, out[-3000:]

    # 1) killed while checkpoint-4 is half written: the .partial folder must never be used
    code, _ = run(tmp_path / "killed.yaml", crash_at="checkpoint:4")
    assert code == -signal.SIGKILL
    ckdir = tmp_path / "killed" / "checkpoints"
    assert (ckdir / "checkpoint-4.partial").exists()
    assert ckpt.latest_checkpoint(ckdir).name == "checkpoint-2"
    # 2) resume, killed again at random steps (between checkpoints and on them), until the run completes
    rng = random.Random(0)
    kills = 0
    while kills < 3:
        done = logged_steps(tmp_path / "killed")
        if done >= max_steps - 1:
            break
        code, out = run(tmp_path / "killed.yaml", "--resume", kill_at_step=rng.randint(done + 1, max_steps - 1),
                        out_dir=tmp_path / "killed")
        assert code == -signal.SIGKILL, out[-3000:]
        kills += 1
    code, out = run(tmp_path / "killed.yaml", "--resume")
    assert code == 0, out[-3000:]
    assert kills >= 2

    # the exported LoRA (= the EMA weights) and the last checkpoint (raw weights + EMA shadow) match bit for bit
    last = f"checkpoints/{ckpt.latest_checkpoint(tmp_path / 'ref' / 'checkpoints').name}/weights.safetensors"
    for weights in ("pytorch_lora_weights.safetensors", last):
        a = load_file(str(tmp_path / "ref" / weights))
        b = load_file(str(tmp_path / "killed" / weights))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), weights
        assert weights != last or any(k.startswith("ema.") for k in a)
    assert losses(tmp_path / "ref") == losses(tmp_path / "killed")
    assert len(losses(tmp_path / "ref")) == max_steps
    assert len(ckpt.list_checkpoints(ckdir)) <= 2  # retention: keep the last K
