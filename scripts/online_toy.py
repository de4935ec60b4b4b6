"""The online-RL study of docs/online.md: GRPO and DiffusionNFT on the two toy worlds (U-Net ``sd``, rectified-flow
``flow``) against the toy oracle, 3 seeds each, and one run that optimises the deliberately hackable
``brightness`` reward with the toy oracle held out, to show the reward-hacking monitor flag it.

Each run is ``diffalign.toy.demo.run_demo(..., online=objective)``: train, then generate the 12 held-out prompts
x k images with the same seeds for the base and the aligned model (the deterministic sampler of the toy worlds) and
score them with the oracle. Writes ``OUT/results.json``, ``OUT/table.md`` (mean over seeds, with each seed) and
``OUT/online_curves.png`` (training reward and the monitor's curves of every run).

    python scripts/online_toy.py --out runs/online-study --seeds 0 1 2 --jobs 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

RUNS = [(objective, world) for objective in ("grpo", "nft") for world in ("sd", "flow")]


def _run_one(out: Path, objective: str, world: str, seed: int, reward: str, threads: int) -> dict:
    """One run in its own process (one torch thread each: on 2 cores, two such processes beat one with two)."""
    folder = out / f"{objective}-{world}-{reward}-seed{seed}"
    report = folder / "report.json"
    if not report.exists():
        code = (f"import torch; torch.set_num_threads({threads}); from diffalign.toy.demo import run_demo; "
                f"run_demo({str(folder)!r}, {seed}, quiet=True, world={world!r}, online={objective!r}, "
                f"reward={reward!r})")
        log = folder.with_suffix(".log")
        folder.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:
            subprocess.run([sys.executable, "-c", code], stdout=f, stderr=subprocess.STDOUT, check=True)
    data = json.loads(report.read_text())
    history = [json.loads(ln) for ln in (folder / "metrics.jsonl").read_text().splitlines()]
    return {"objective": objective, "world": world, "seed": seed, "reward": reward,
            "base": data["base_reward"], "aligned": data["aligned_reward"], "win_rate": data["win_rate"],
            "train_seconds": data["train_seconds"], "monitor_flags": data["monitor_flags"], "history": history}


def _table(results: list[dict]) -> str:
    lines = ["| objective | world | base oracle reward | aligned | gain | win rate | seeds (gain) | train s/run |",
             "|---|---|---|---|---|---|---|---|"]
    for objective, world in RUNS:
        rows = [r for r in results if r["objective"] == objective and r["world"] == world and r["reward"] == "toy"]
        if not rows:
            continue
        base, aligned = np.mean([r["base"] for r in rows]), np.mean([r["aligned"] for r in rows])
        seeds = ", ".join(f"{r['seed']}: {r['aligned'] - r['base']:+.3f}" for r in rows)
        lines.append(f"| {objective} | {world} | {base:.4f} | {aligned:.4f} | {aligned - base:+.4f} | "
                     f"{np.mean([r['win_rate'] for r in rows]):.3f} | {seeds} | "
                     f"{np.mean([r['train_seconds'] for r in rows]):.0f} |")
    for r in results:
        if r["reward"] != "toy":
            flag = r["monitor_flags"][0]["reason"] if r["monitor_flags"] else "not flagged"
            lines.append(f"\n{r['objective']} on {r['world']} against `{r['reward']}` (seed {r['seed']}): held-out "
                         f"oracle {r['base']:.4f} -> {r['aligned']:.4f}; monitor: {flag}")
    return "\n".join(lines) + "\n"


def _plot(results: list[dict], path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    honest = [r for r in results if r["reward"] == "toy"]
    hacked = [r for r in results if r["reward"] != "toy"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for i, (objective, world) in enumerate(RUNS):
        rows = [r for r in honest if r["objective"] == objective and r["world"] == world]
        if not rows:
            continue
        steps = [h["step"] for h in rows[0]["history"]]
        rewards = np.array([[h["reward"] for h in r["history"]] for r in rows])
        k = 10
        smooth = np.array([np.convolve(x, np.ones(k) / k, mode="valid") for x in rewards])
        axes[0].plot(steps[k - 1:], smooth.mean(0), color=f"C{i}", label=f"{objective} / {world}")
        axes[0].fill_between(steps[k - 1:], smooth.min(0), smooth.max(0), color=f"C{i}", alpha=0.15)
    axes[0].set_title("training reward (toy oracle), rollout mean,\n10-step average; band: min-max over seeds",
                      fontsize=9)
    axes[0].legend(fontsize=7)
    for r in hacked:  # the monitor's view: the fixed evaluation set (the held-out prompts, same seeds)
        rows = [h for h in r["history"] if "eval/reward" in h]
        steps = [h["step"] for h in rows]
        ax = axes[1]
        ax.plot(steps, [h["eval/reward"] for h in rows], "o-", color="C0", label=f"training reward: {r['reward']}")
        ax.set_ylabel(r["reward"], color="C0")
        twin = ax.twinx()
        twin.plot(steps, [h["eval/heldout/toy"] for h in rows], "s-", color="C3", label="held-out: toy oracle")
        twin.set_ylabel("toy oracle (held out)", color="C3")
        for key in sorted(k for k in rows[0] if k.startswith("eval/artefact/")):
            vals = np.array([h[key] for h in rows])
            axes[2].plot(steps, vals / max(abs(vals[0]), 1e-12), "o-", label=key[len("eval/artefact/"):])
        flagged = [h["step"] for h in r["history"] if h.get("monitor/flagged")]
        for a in axes[1:]:
            if flagged:
                a.axvspan(flagged[0], steps[-1], color="red", alpha=0.08)
        ax.set_title(f"{r['objective']} / {r['world']} against {r['reward']}, evaluation set\n"
                     f"red: monitor flagged (from step {flagged[0] if flagged else '-'})", fontsize=9)
        axes[2].set_title("same run: artefact statistics / first value", fontsize=9)
        twin.legend(fontsize=7, loc="lower left")
        break
    for ax in axes:
        ax.set_xlabel("step")
    axes[1].legend(fontsize=7, loc="upper left")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/online-study")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (one torch thread each)")
    p.add_argument("--hack-reward", default="brightness", help="the hackable reward of the monitor run ('' = skip)")
    args = p.parse_args(argv)
    out = Path(args.out)
    todo = [(o, w, s, "toy") for o, w in RUNS for s in args.seeds]
    if args.hack_reward:
        todo.insert(0, ("nft", "sd", args.seeds[0], args.hack_reward))
    start = time.time()
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda job: _run_one(out, *job, threads=1), todo))
    (out / "results.json").write_text(json.dumps([{k: v for k, v in r.items() if k != "history"}
                                                  for r in results], indent=2))
    table = _table(results)
    (out / "table.md").write_text(table)
    _plot(results, out / "online_curves.png")
    print(table)
    print(f"{len(todo)} runs in {time.time() - start:.0f} s; wrote {out / 'table.md'}, {out / 'online_curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
