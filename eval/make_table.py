"""Collect ``OUT/<config>/<prompt_set>/<candidate>/summary.json`` into a markdown table, ours beside the figures
reported by the papers (``eval/reported.json``; ``—`` where none was transcribed).

    python eval/make_table.py runs/eval [--reported eval/reported.json]   # writes runs/eval/table.md

HPS columns are shown x100 (the scale of the HPSv2 README tables); every other metric as ``score`` returns it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCALE = {"hpsv2": 100.0, "hpsv2.1": 100.0}


def label(metric: str) -> str:
    return f"{metric} (x100)" if metric in SCALE else metric


def collect(root: Path) -> list[dict]:
    rows = []
    for path in sorted(root.glob("*/*/*/summary.json")):
        config, prompt_set, candidate = path.parts[-4:-1]
        summary = json.loads(path.read_text())
        for metric, per_model in summary["metrics"].items():
            k = SCALE.get(metric, 1.0)
            for model, s in per_model.items():
                rows.append(
                    {
                        "config": config,
                        "prompt_set": prompt_set,
                        "model": model,
                        "metric": label(metric),
                        "ours": f"{k * s['mean']:.4g} ± {k * (s['ci_high'] - s['ci_low']) / 2:.2g}",
                        "n": s["n"],
                    }
                )
            w = summary["win_rates"].get(metric)
            if w:
                rows.append(
                    {
                        "config": config,
                        "prompt_set": prompt_set,
                        "model": candidate,
                        "metric": f"win_rate_vs_base/{metric}",
                        "ours": f"{w['rate']:.3f} [{w['ci_low']:.3f}, {w['ci_high']:.3f}]",
                        "n": w["n"],
                    }
                )
    return rows


def table(rows: list[dict], reported: list[dict]) -> str:
    def key(r):
        return (r["config"], r["prompt_set"], r["model"], r["metric"])

    rep = {key(r): r for r in reported}
    seen = set()
    lines = [
        "| config | prompts | model | metric | ours (mean ± CI half-width) | n | reported | source |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if key(r) in seen:  # the base appears in every candidate's run; keep the first
            continue
        seen.add(key(r))
        ref = rep.get(key(r), {})
        value = ref.get("value")
        lines.append(
            f"| {' | '.join(map(str, key(r)))} | {r['ours']} | {r['n']} | {'—' if value is None else value} | {ref.get('source', '')} |"
        )
    for k, ref in rep.items():  # reported figures with no run of ours yet (anchors, placeholders)
        if k not in seen:
            value = ref.get("value")
            lines.append(
                f"| {' | '.join(map(str, k))} | (not run) | | {'—' if value is None else value} | {ref.get('source', '')} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", type=Path, help="the --out of eval/reproduce.py")
    p.add_argument("--reported", type=Path, default=HERE / "reported.json")
    args = p.parse_args(argv)
    text = table(collect(args.root), json.loads(args.reported.read_text())["rows"])
    (args.root / "table.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
