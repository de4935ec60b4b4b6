"""SIGKILL a training process at random moments (once mid-checkpoint-write) and resume until it finishes: the final
weights and the logged loss curve equal an uninterrupted run's, bit for bit."""

import json
import os
import random
import signal
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from diffalign.testing import base_config
from diffalign.training import checkpoint as ckpt

CMD = [sys.executable, "-m", "diffalign.cli", "train"]


def run(cfg_path, *extra, env=None, kill_after=None):
    proc = subprocess.Popen([*CMD, str(cfg_path), *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})})
    if kill_after is not None:
        try:
            proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
    out = proc.communicate(timeout=600)[0].decode(errors="replace")
    return proc.returncode, out


def losses(out_dir):
    return [json.loads(x)["loss"] for x in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["dpo", "seppo"])
def test_sigkill_and_resume_is_bit_identical(objective, tiny_sd15_dir, pickapic_dir, tmp_path):
    obj = "dpo" if objective == "dpo" else {"name": "seppo", "snapshot_every": 2, "max_snapshots": 3,
                                            "sampling_steps": 2, "guidance_scale": 2.0}
    kw = {"max_steps": 8, "checkpoint_every": 2, "keep_last_checkpoints": 2, "objective": obj,
          "optimizer.lr_scheduler": "cosine", "optimizer.warmup_steps": 2}
    for name in ("ref", "killed"):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(base_config(tiny_sd15_dir, pickapic_dir,
                                                                          tmp_path / name, **kw)))
    code, out = run(tmp_path / "ref.yaml")
    assert code == 0, out[-3000:]

    # 1) killed while checkpoint-4 is half written: the .partial folder must never be used
    code, _ = run(tmp_path / "killed.yaml", env={"DIFFALIGN_FAULT": "checkpoint:4"})
    assert code == -signal.SIGKILL
    ckdir = tmp_path / "killed" / "checkpoints"
    assert (ckdir / "checkpoint-4.partial").exists()
    assert ckpt.latest_checkpoint(ckdir).name == "checkpoint-2"
    # 2) resume, killed again at random moments, until the run completes
    rng = random.Random(0)
    for attempt in range(8):
        code, out = run(tmp_path / "killed.yaml", "--resume", kill_after=rng.uniform(6, 14))
        if code == 0:
            break
        assert code == -signal.SIGKILL, out[-3000:]
    else:
        code, out = run(tmp_path / "killed.yaml", "--resume")
        assert code == 0, out[-3000:]

    a = load_file(str(tmp_path / "ref" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "killed" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "ref") == losses(tmp_path / "killed")
    assert len(losses(tmp_path / "ref")) == 8
    assert len(ckpt.list_checkpoints(ckdir)) <= 2  # retention: keep the last K
