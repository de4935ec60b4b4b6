"""Smoke test of ``bench/online.py``: GRPO and NFT on the toy world, one warm-up and one measured step each,
small rollouts, in this process (``--isolation none``), well under 30 s."""

import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TIMES = ("step_s", "step_cpu_s", "sample_s", "score_s", "train_s", "s_per_image", "s_per_update",
         "peak_rss_gib")


def test_online_bench_on_toy_writes_finite_timings_and_shares_summing_to_one(tmp_path, monkeypatch):
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from bench import online

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # main() sets these for its runs; restored after the test
    monkeypatch.setenv("TQDM_DISABLE", "1")
    out = tmp_path / "online.json"
    online.main(["--worlds", "toy", "--objectives", "grpo,nft", "--steps", "1", "--warmup", "1",
                 "--batch-size", "2", "--group-size", "2", "--num-inference-steps", "3",
                 "--isolation", "none", "--workdir", str(tmp_path / "work"), "--out", str(out)])
    data = json.loads(out.read_text())

    assert data["meta"]["threads"] == 1 and len(data["meta"]["loadavg_start"]) == 3
    runs = {r["objective"]: r for r in data["runs"]}
    assert set(runs) == {"grpo", "nft"}
    for r in runs.values():
        assert r["status"] == "ok" and r["world"] == "toy" and r["measured_steps"] == 1
        assert r["images_per_step"] == 4 and len(r["steps"]) == 2  # the warm-up is in the raw steps only
        for key in TIMES:
            assert math.isfinite(r[key]) and r[key] > 0, key
        shares = [r["sample_share"], r["score_share"], r["train_share"]]
        assert all(0 < s < 1 for s in shares)
        assert math.isclose(sum(shares), 1.0, abs_tol=1e-9)  # by construction over sample + score + train
        assert 0 <= r["other_share"] < 0.5  # the step's time outside the three phases, reported apart
        parts = r["sample_s"] + r["score_s"] + r["train_s"] + r["other_s"]
        assert math.isclose(r["step_s"], parts, rel_tol=1e-9)
        # the demo's monitor evaluates its fixed set at step 1 (the warm-up): timed apart, not in the step
        assert r["evaluations"] == 1 and r["eval_s"] > 0 and r["eval_every"] == 5
        assert r["steps"][0]["eval_s"] == r["eval_s"] and r["steps"][1]["eval_s"] == 0
    assert runs["grpo"]["updates_per_step"] == 2 and runs["nft"]["updates_per_step"] == 1  # the demo's
    assert "| toy | grpo |" in online.markdown(data)
