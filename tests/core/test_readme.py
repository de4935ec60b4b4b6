"""The README's snippets and commands, run as written (model ids swapped for local tiny models)."""

import contextlib
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fixtures.data import base_config

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()
PY_BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)


def test_objective_snippet_prints_the_documented_values():
    block = next(b for b in PY_BLOCKS if "dpo_loss" in b)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block, "README", "exec"), {})
    assert out.getvalue().split("\n")[:2] == ["tensor(0.4741)", "tensor(0.1007)"]


def test_lora_snippet_loads_a_trained_adapter(tiny_sd15_dir, pickapic_dir, tmp_path):
    from diffalign.training.config import parse_config
    from diffalign.training.trainer import PreferenceTrainer

    tr = PreferenceTrainer(parse_config(base_config(tiny_sd15_dir, pickapic_dir, tmp_path / "run", max_steps=2)))
    tr.setup().train()
    block = next(b for b in PY_BLOCKS if "load_lora_weights" in b)
    block = block.replace('"stable-diffusion-v1-5/stable-diffusion-v1-5"', repr(tiny_sd15_dir))
    block = block.replace('"runs/sd15-dpo"', repr(str(tmp_path / "run")))
    block = block.replace(".manual_seed(0))", ".manual_seed(0), num_inference_steps=2, height=32, width=32)")
    scope = {}
    exec(compile(block, "README", "exec"), scope)
    assert scope["image"].size == (32, 32)
    assert "default_0" in scope["pipe"].get_active_adapters() or scope["pipe"].get_active_adapters()


@pytest.mark.slow
def test_accelerate_launch_runs_the_trainer(tiny_sd15_dir, pickapic_dir, tmp_path):
    assert "accelerate launch -m diffalign.cli train" in README
    cfg = base_config(tiny_sd15_dir, pickapic_dir, tmp_path / "run", max_steps=2)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--cpu", "-m", "diffalign.cli", "train",
           str(tmp_path / "c.yaml")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").exists()
