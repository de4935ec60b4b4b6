"""``diffalign demo --objective grpo|nft``: the online toy run end to end (small budget), and the flags reaching
``run_demo``."""

import json
import re

import torch

from diffalign.toy import demo


def test_online_demo_runs_end_to_end(tmp_path, capsys):
    torch.set_num_threads(1)
    report = demo.run_demo(tmp_path / "run", 0, world="sd", online="grpo", max_steps=2, batch_size=2,
                           group_size=2, num_inference_steps=4)
    out = capsys.readouterr().out
    line = re.search(r"base reward (\S+)  aligned reward (\S+)  win rate (\S+)% on 24 held-out images", out)
    assert line, out
    assert float(line.group(1)) == round(report["base_reward"], 4) and 0 <= report["win_rate"] <= 1
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    assert saved["reward"] == "toy" and saved["monitor_flags"] == [] and saved["config"]["objective"]["name"] == "grpo"
    history = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "eval/reward" in history[0] and "eval/heldout/toy" in history[0]  # the monitor's evaluation set
    for name in ("samples.png", "curves.png", "pytorch_lora_weights.safetensors"):
        assert (tmp_path / "run" / name).stat().st_size > 0


def test_demo_flags_reach_the_online_run(monkeypatch):
    seen = {}
    monkeypatch.setattr(demo, "run_demo", lambda out, seed, **kw: seen.update(kw))
    demo.main(["--objective", "nft", "--world", "flow", "--reward", "brightness", "--max-steps", "3"])
    assert seen == {"world": "flow", "online": "nft", "reward": "brightness", "max_steps": 3}
    demo.main(["--objective", "grpo"])
    assert seen["online"] == "grpo" and seen["max_steps"] == demo.ONLINE_DEMO_DEFAULTS["grpo"]["max_steps"]
