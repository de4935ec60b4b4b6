"""The peer harness (``bench/peers.py``) and its in-process launcher (``bench/peer_launch.py``), on a fake peer
script (``tests/fixtures/fake_peer.py``) and synthetic step clocks: no real peer script, no network."""

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FAKE = ROOT / "tests" / "fixtures" / "fake_peer.py"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import peers


def _launch(tmp_path, launcher, rest, name="run", extra_path=None):
    run_dir = tmp_path / name
    run_dir.mkdir()
    env = peers.child_env(1, tmp_path)
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], str(extra_path)])
    return peers.launch(name, launcher, rest, run_dir, env, timeout=120)


# ------------------------------------------------------------------ launcher
def test_hook_records_every_step_of_any_optimizer_and_the_wandb_stub_loads(tmp_path):
    rec = _launch(tmp_path, ["--stub-wandb"], [str(FAKE), "--wandb", "--adamw", "3", "--sgd", "2"])
    assert rec["status"] == "ok" and rec["exit_code"] == 0 and rec["returncode"] == 0
    assert rec["num_steps"] == len(rec["steps"]) == 5  # 3 AdamW + 2 SGD steps: one global hook sees both
    perf = [s[0] for s in rec["steps"]]
    assert rec["start"][0] < perf[0] and perf == sorted(perf)
    assert 0 < rec["peak_rss_gib"] < 64 and rec["wall_s"] > 0
    assert rec["env_threads"]["OMP_NUM_THREADS"] == "1" and rec["torch_threads"] == 1
    assert len(rec["loadavg_start"]) == len(rec["loadavg_end"]) == 3
    if importlib.util.find_spec("wandb") is None:
        assert rec["shims"]["wandb"].startswith("empty stub module")


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_without_the_wandb_stub_the_top_level_import_fails(tmp_path):
    rec = _launch(tmp_path, [], [str(FAKE), "--wandb", "--adamw", "2"])
    assert rec["status"] == "error" and rec["returncode"] == 1
    assert "No module named 'wandb'" in rec["error"] and rec["num_steps"] == 0


def test_xformers_shim_lets_the_official_check_pass_and_keeps_sdpa(tmp_path):
    shimmed = _launch(tmp_path, ["--shim-xformers"], [str(FAKE), "--xformers", "--adamw", "2"], name="shim")
    assert shimmed["status"] == "ok", shimmed["log_tail"]
    assert shimmed["num_steps"] == 2
    info = shimmed["shims"]["xformers"]
    assert info["is_xformers_available_calls"] == 1 and info["enable_xformers_calls"] == 1
    plain = _launch(tmp_path, [], [str(FAKE), "--xformers", "--adamw", "2"], name="plain")
    assert plain["status"] == "error" and plain["num_steps"] == 0 and plain["shims"] == {}
    assert plain["error"] == "ValueError: xformers is not available. Make sure it is installed correctly"


def test_record_is_written_when_the_program_fails(tmp_path):
    raised = _launch(tmp_path, [], [str(FAKE), "--adamw", "4", "--raise-after", "2"], name="raised")
    assert raised["status"] == "error" and raised["num_steps"] == 2 and raised["peak_rss_gib"] > 0
    assert "failing after 2 steps" in raised["error"] and "RuntimeError" in raised["traceback_tail"][-1]
    # module mode (as `--module diffalign.cli`), ending with sys.exit(3) after its steps
    exited = _launch(tmp_path, ["--module", "fixtures.fake_peer"], ["--adamw", "2", "--exit", "3"], name="exited",
                     extra_path=ROOT / "tests")
    assert exited["status"] == "exit" and exited["exit_code"] == 3 and exited["returncode"] == 3
    assert exited["num_steps"] == 2
    # killed without cleanup: no record, the harness says so and keeps the log
    killed = _launch(tmp_path, [], [str(FAKE), "--hard-exit", "7"], name="killed")
    assert killed["status"] == "error" and killed["returncode"] == 7 and "wrote no record" in killed["error"]


# ------------------------------------------------------------------ scripts
def test_identify_by_content_and_one_line_errors(tmp_path):
    d = tmp_path / "train_diffusion_dpo.py"
    d.write_text("unet.disable_adapters()\n")
    o = tmp_path / "train.py"
    o.write_text("ref_unet = None\nref_unet.eval()\n")
    info = peers.identify_all(f"{d},{o}")
    assert info["diffusers"]["upstream"] == "unknown version" and info["official"]["lines"] == 2
    assert len(info["official"]["sha256"]) == 64
    with pytest.raises(peers.PeerError, match="not found"):
        peers.identify(str(tmp_path / "missing.py"))
    (tmp_path / "other.py").write_text("print(1)\n")
    (tmp_path / "notes.md").write_text("diffusers calls `unet.disable_adapters()` for the reference\n")
    for other in ("other.py", "notes.md"):  # no marker; a marker in prose, not Python
        with pytest.raises(peers.PeerError, match="not recognised"):
            peers.identify(str(tmp_path / other))
    with pytest.raises(peers.PeerError, match="two diffusers scripts"):
        peers.identify_all(f"{d},{d}")


# ------------------------------------------------------------------ numbers and table
def _synthetic() -> dict:
    """Hand-worked clocks: 3 pairs, so diffalign's epoch 1 = steps 1-3 and epoch 2+ = steps 4-6."""
    ours = [[10.0, 5.0], [12.0, 6.0], [13.0, 6.5], [14.5, 7.5], [15.0, 7.75], [15.5, 8.0]]
    hits = [{"step": s, peers.HITS_KEY: h} for s, h in zip(range(1, 7), (0.0, 0.0, 0.0, 1.0, 0.5, 1.0))]
    runs = {
        "diffusers": {"status": "ok", "steps": [[0.0, 0], [2.0, 1], [4.5, 2], [6.5, 3]], "peak_rss_gib": 2.0,
                      "steps_requested": 4, "shims": {"wandb": "empty stub module (wandb not installed)"}},
        "official": {"status": "ok", "steps": [[0.0, 0], [4.0, 3], [8.0, 6], [13.0, 10]], "peak_rss_gib": 8.0,
                     "steps_requested": 4, "shims": {}},
        "diffalign_noflip": {"status": "ok", "steps": ours, "peak_rss_gib": 1.0, "steps_requested": 6,
                             "metrics": hits},
        "diffalign_flip": {"status": "error", "steps": ours[:2], "peak_rss_gib": 1.0, "steps_requested": 6,
                           "error": "RuntimeError: boom", "log_tail": ["line a", "RuntimeError: boom"],
                           "returncode": 1, "log": "/x/run.log"},
    }
    return runs


def test_epoch_split_and_ratios_match_hand_worked_values():
    assert peers.step_range("epoch1", 6, 3) == (1, 3) and peers.step_range("epoch2", 6, 3) == (4, 6)
    rows = {(r["run"], r["which"]): r for r in peers.rows(_synthetic(), pairs=3)}
    d, o = rows["diffusers", "all"], rows["official", "all"]
    assert (d["n"], d["median_s"], d["min_s"], d["max_s"], d["cpu_median_s"]) == (3, 2.0, 2.0, 2.5, 1.0)
    assert (o["n"], o["median_s"], o["cpu_median_s"]) == (3, 4.0, 3.0)
    e1, e2 = rows["diffalign_noflip", "epoch1"], rows["diffalign_noflip", "epoch2"]
    assert (e1["n"], e1["median_s"], e1["min_s"], e1["max_s"], e1["cpu_median_s"]) == (2, 1.5, 1.0, 2.0, 0.75)
    assert (e2["n"], e2["median_s"], e2["min_s"], e2["max_s"], e2["cpu_median_s"]) == (3, 0.5, 0.5, 1.5, 0.25)
    assert e1["cache_hits"] == 0.0 and e2["cache_hits"] == 0.5  # min over steps 4-6
    assert e2["time_vs_diffusers"] == pytest.approx(0.25) and e2["time_vs_official"] == pytest.approx(0.125)
    assert e1["time_vs_diffusers"] == pytest.approx(0.75) and e1["time_vs_official"] == pytest.approx(0.375)
    assert e2["rss_vs_diffusers"] == pytest.approx(0.5) and e2["rss_vs_official"] == pytest.approx(0.125)
    assert d["time_vs_diffusers"] == 1.0 and d["time_vs_official"] == pytest.approx(0.5)
    failed = rows["diffalign_flip", "epoch2"]
    assert failed["status"] == "error" and failed["time_vs_diffusers"] is None and failed["n"] == 0


def _result(runs) -> dict:
    return {
        "kind": peers.KIND,
        "meta": {"command": "python bench/run.py --peers a,b", "date_utc": "2026-01-01T00:00:00+00:00",
                 "cpu": {"model": "Test CPU", "logical_cpus": 2,
                         "flags": {f: f == "avx2" for f in peers.CPU_FLAGS}},
                 "threads": 2, "loadavg_before": [0.1, 0.2, 0.3], "loadavg_after": [0.4, 0.5, 0.6],
                 "versions": {"torch": "2.0", "xformers": None}, "peer_steps": 4, "diffalign_steps": 6},
        "world": {"world": "toy", "pipeline": "/p", "pipeline_source": "test", "data": "/d/pickapic", "pairs": 3,
                  "resolution": 32},
        "scripts": {"diffusers": {"path": "/s/train_diffusion_dpo.py", "sha256": "ab" * 32, "lines": 983,
                                  "upstream": "unknown version"}},
        "runs": runs, "rows": peers.rows(runs, pairs=3),
    }


def test_table_prints_every_row_and_the_failure(tmp_path, capsys):
    text = peers.markdown(_result(_synthetic()))
    for label, _, _ in peers.ROWS:
        assert f"| {label} |" in text
    assert ("| diffalign epoch 2+ (cache hit), random_flip false | 6/6 | 0.500 (0.500-1.500, 3) | 0.250 | 1.00 | "
            "0.25 | 0.12 | 0.50 | 0.12 | 0.50 |") in text
    assert "| diffusers train_diffusion_dpo.py (unmodified) | 4/4 | 2.000 (2.000-2.500, 3) |" in text
    assert "| diffalign epoch 1, random_flip true | 2/6 | **error**: RuntimeError: boom |" in text
    assert "diffalign_flip failed (error, code 1)" in text and "avx2 yes, avx512f no" in text
    assert "xformers not installed" in text and "load average before 0.1 0.2 0.3, after 0.4 0.5 0.6" in text
    # bench/run.py --report prints a peers file again
    path = tmp_path / "peers.json"
    path.write_text(json.dumps(_result(_synthetic())))
    from bench import run

    run.main(["--report", str(path)])
    assert "| diffalign epoch 1 (cache miss) | 6/6 | 1.500 (1.000-2.000, 2) |" in capsys.readouterr().out


def test_hits_are_na_without_the_metrics_key():
    runs = _synthetic()
    runs["diffalign_noflip"]["metrics"] = [{"step": s, "loss": 0.7} for s in range(1, 7)]
    text = peers.markdown(_result(runs))
    row = next(line for line in text.splitlines() if line.startswith("| diffalign epoch 2+ (cache hit)"))
    assert row.endswith("| n/a |")
