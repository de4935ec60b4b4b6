"""The GPU reproduction scripts in eval/ stay runnable: command construction (dry run) and table assembly."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _module(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "eval" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reproduce_dry_run_builds_paired_commands(capsys):
    assert (
        _module("reproduce").main(
            [
                "--config",
                str(ROOT / "eval/configs/sd15.json"),
                "--prompt-set",
                "partiprompts",
                "--dry-run",
                "--limit",
                "5",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2  # released DPO UNet, our LoRA
    assert (
        "--unet mhdang/dpo-sd1.5-text2image-v1" in lines[0]
        and "--model-b runwayml/stable-diffusion-v1-5" in lines[0]
    )
    assert "--guidance 7.5" in lines[0] and "--prompts hf:nateraw/parti-prompts:train:Prompt" in lines[0]
    assert "--lora runs/sd15-dpo-lora/final" in lines[1]
    from diffalign.evaluators.cli import build_parser

    argv = lines[1].split()[2:]  # drop "diffalign eval"
    args = build_parser().parse_args(argv)
    assert (
        args.metric == ["pickscore", "hpsv2", "hpsv2.1", "imagereward", "clip", "aesthetic"]
        and args.limit == 5
    )


def test_make_table_puts_ours_beside_reported(tmp_path):
    run = tmp_path / "sdxl" / "partiprompts" / "dpo-released"
    run.mkdir(parents=True)
    stat = {"mean": 0.25, "std": 0.01, "ci_low": 0.24, "ci_high": 0.26, "n": 4, "confidence": 0.95}
    summary = {
        "metrics": {"hpsv2": {"dpo-released": stat, "base": {**stat, "mean": 0.2}}},
        "win_rates": {
            "_pair": "dpo-released vs base",
            "hpsv2": {"rate": 0.75, "ci_low": 0.5, "ci_high": 1.0, "wins": 3, "ties": 0, "losses": 1, "n": 4},
        },
    }
    (run / "summary.json").write_text(json.dumps(summary))
    reported = tmp_path / "reported.json"
    reported.write_text(
        json.dumps(
            {
                "rows": [
                    {
                        "config": "sdxl",
                        "prompt_set": "partiprompts",
                        "model": "base",
                        "metric": "hpsv2 (x100)",
                        "value": 19.9,
                        "source": "paper T1",
                    }
                ]
            }
        )
    )
    _module("make_table").main([str(tmp_path), "--reported", str(reported)])
    table = (tmp_path / "table.md").read_text()
    assert "| sdxl | partiprompts | dpo-released | hpsv2 (x100) | 25 ± 1 | 4 | — |" in table
    assert "| sdxl | partiprompts | base | hpsv2 (x100) | 20 ± 1 | 4 | 19.9 | paper T1 |" in table
    assert "win_rate_vs_base/hpsv2 | 0.750 [0.500, 1.000]" in table
