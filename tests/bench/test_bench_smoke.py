"""Smoke test of ``bench/run.py``: the quick path on the toy world, one repetition, in this process.

``--isolation none`` keeps it under 30 s: the default isolation starts a fresh process per configuration (peak RSS
from ``ru_maxrss``), which costs a forkserver start (~15-20 s of imports on a busy 2-core machine).
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STRATEGIES = ("official", "diffusers", "ours_first_epoch", "ours_cached")
RATIO_KEYS = (
    "ours_vs_official_time_ratio", "ours_vs_diffusers_time_ratio", "ours_vs_official_peak_rss_ratio",
    "ours_vs_diffusers_peak_rss_ratio", "ours_first_epoch_vs_official_time_ratio",
    "ours_first_epoch_vs_diffusers_time_ratio", "cached_vs_first_epoch_speedup",
)


def test_quick_path_on_toy_writes_every_strategy_and_ratio(tmp_path):
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from bench import run

    out = tmp_path / "quick.json"
    run.main(["--quick", "--reps", "1", "--configs", "toy", "--sections", "strategies", "--isolation", "none",
              "--workdir", str(tmp_path / "work"), "--out", str(out)])
    data = json.loads(out.read_text())

    assert {"command", "machine", "threads", "loadavg_start", "loadavg_end", "device"} <= set(data["meta"])
    entries = {(e["config"], e["strategy"]): e for e in data["entries"]}
    assert set(entries) == {("toy", s) for s in STRATEGIES}
    for e in entries.values():
        assert e["median_step_s"] > 0
        assert e["peak_rss_gib"] > 0
    toy = data["configs"]["toy"]
    for key in RATIO_KEYS:
        assert toy[key] > 0, key
        assert toy["strategies"]["ratios"][key] == toy[key]
    cached = toy["strategies"]["entries"]["ours_cached"]
    assert cached["flops_per_step"] > 0 and cached["pairs_per_s"] > 0
    assert len(cached["step_times_s_interleaved"]) == 1


def test_flow_strategies_on_tiny_sd3_give_finite_losses_and_train_the_lora(tmp_path):
    """``--sections flow`` on the tiny SD3.5-like world: flow_grpo's Flow-DPO step and ours, interleaved in
    this process, one repetition."""
    import math

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from bench import run

    out = tmp_path / "flow.json"
    run.main(["--configs", "sd3_tiny", "--sections", "flow", "--reps", "1", "--isolation", "none",
              "--workdir", str(tmp_path / "work"), "--out", str(out)])
    data = json.loads(out.read_text())

    flow = data["configs"]["sd3_tiny"]["flow"]
    for name in ("flow_grpo", "flow_grpo_body", "ours_first_epoch", "ours_cached"):
        e = flow["entries"][name]
        assert e["median_step_s"] > 0, name
        assert e["losses_interleaved"] and all(math.isfinite(x) for x in e["losses_interleaved"]), name
        assert e["flops_per_step"] > 0, name
    checks = flow["checks"]
    assert checks["ours_lora_max_abs_change"] > 0  # the ours step trained the LoRA
    assert checks["flow_grpo_learner_max_abs_change"] > 0
    assert checks["ours_trainable_params"] == checks["flow_grpo_trainable_params"]  # same r, targets
    assert checks["cache"]["hits"] > 0 and checks["cache"]["misses"] > 0
    for key in ("ours_vs_flow_grpo_time_ratio", "ours_first_epoch_vs_flow_grpo_time_ratio",
                "ours_vs_flow_grpo_body_time_ratio"):
        assert data["configs"]["sd3_tiny"][key] > 0, key
