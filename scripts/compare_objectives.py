"""Every objective on the toy world with the same budget and seeds -> docs/objectives.md.

    python scripts/compare_objectives.py [--seeds 0 1 2] [--max-steps 150] [--threads 1]
    python scripts/compare_objectives.py --world flow [--seeds 0 1 2] [--threads 1]

``--world flow``: the toy flow world instead (``assets/toy-flow``, an SD3-style pipeline, with
``assets/toy-flow-pairs``), the objectives that run on sd3 (:data:`FLOW_OBJECTIVES`) with the settings of
``diffalign demo --world flow``; its table is the "toy flow world" section of docs/objectives.md, which a
U-Net run keeps (and vice versa).

Each (objective, seed) runs in a fresh subprocess (so peak RSS is that run's own) through the same code path as
``diffalign demo``: LoRA training on the shipped toy pairs (``assets/toy-pairs``) with the demo's settings (LoRA r=8,
batch 8, lr 1e-3, constant schedule), then base vs. aligned oracle reward on the held-out prompts with the same
seeds. Each finished run is kept as ``<out>/<objective>-<seed>/result.json`` and reused on a rerun, so an
interrupted comparison resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

# Per-objective settings on the toy world. The DPO family (DPO, DCPO, InPO, SePPO) uses the demo's β = 1000 (toy
# latents have 256 dims, so per-sample error differences are noisier than SD's and the official 5000 saturates);
# MaPO's β weighs a bounded log-odds margin, its official default 0.1 is kept. Everything else is shared.
OBJECTIVES = {
    "dpo": {"name": "dpo", "beta": 1000.0},
    "mapo": {"name": "mapo", "beta": 0.1},
    "dcpo": {"name": "dcpo", "beta": 1000.0, "loser_caption": "word_swap", "swap_fraction": 0.4},
    "inpo": {"name": "inpo", "beta": 1000.0},
    "seppo": {"name": "seppo", "beta": 1000.0, "snapshot_every": 20, "sampling_steps": 10, "guidance_scale": 4.0},
}


# The toy flow world (sd3): Flow-DPO with the demo's β (velocity errors, see assets/README.md) and MaPO's
# official β; inpo/seppo/dcpo are left out (the first two do not run on sd3).
FLOW_OBJECTIVES = {
    "dpo": {"name": "dpo", "beta": 100.0},
    "mapo": {"name": "mapo", "beta": 0.1},
}
FLOW_SECTION = "## The toy flow world"


def objectives(world: str) -> dict:
    return OBJECTIVES if world == "sd" else FLOW_OBJECTIVES


def run_one(objective: str, seed: int, max_steps: int, out: Path, world: str = "sd") -> dict:
    from diffalign.toy.demo import run_demo

    start = time.time()
    extra = {} if world == "sd" else {"world": world}
    report = run_demo(out, seed, quiet=True, objective=objectives(world)[objective], max_steps=max_steps,
                      **extra)
    per_image = report["per_image"]
    gain = np.array([r["aligned"] - r["base"] for r in per_image])
    return {"objective": objective, "seed": seed, "base_reward": report["base_reward"],
            "aligned_reward": report["aligned_reward"], "gain_se": float(gain.std(ddof=1) / np.sqrt(len(gain))),
            "win_rate": report["win_rate"], "n_images": len(per_image),
            "train_s": report["train_seconds"], "wall_s": round(time.time() - start, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "config": objectives(world)[objective]}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", choices=["sd", "flow"], default="sd",
                   help="sd: the U-Net toy world (default); flow: the SD3-style toy world")
    p.add_argument("--objectives", nargs="+", default=None, choices=list(OBJECTIVES),
                   help="default: every objective of the world")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--max-steps", type=int, default=150)
    p.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    p.add_argument("--out", default=None, help="default runs/compare (sd), runs/compare-flow (flow)")
    p.add_argument("--doc", default="docs/objectives.md")
    p.add_argument("--one", nargs=2, metavar=("OBJECTIVE", "SEED"), help=argparse.SUPPRESS)
    args = p.parse_args()
    args.objectives = args.objectives or list(objectives(args.world))
    args.out = args.out or ("runs/compare" if args.world == "sd" else "runs/compare-flow")
    if not set(args.objectives) <= set(objectives(args.world)):
        raise SystemExit(f"--objectives: the {args.world} world runs {', '.join(objectives(args.world))}")
    if args.one:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        obj, seed = args.one[0], int(args.one[1])
        row = run_one(obj, seed, args.max_steps, Path(args.out) / f"{obj}-{seed}", args.world)
        (Path(args.out) / f"{obj}-{seed}" / "result.json").write_text(json.dumps(row, indent=2))
        return
    rows = []
    for obj in args.objectives:
        for seed in args.seeds:
            result = Path(args.out) / f"{obj}-{seed}" / "result.json"
            config = objectives(args.world)[obj]
            if not (result.exists() and json.loads(result.read_text()).get("config") == config):
                cmd = [sys.executable, __file__, "--one", obj, str(seed), "--max-steps", str(args.max_steps),
                       "--out", args.out, "--threads", str(args.threads), "--world", args.world]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0 or not result.exists():
                    raise SystemExit(f"{obj} seed {seed} failed:\n{proc.stderr[-3000:]}")
            rows.append(json.loads(result.read_text()))
            print({k: v for k, v in rows[-1].items() if k != "config"}, flush=True)
    (write_doc if args.world == "sd" else write_flow_doc)(rows, args)


def _split_doc(path: Path) -> tuple[str, str]:
    """(U-Net part, flow section) of the existing doc; the flow section starts at :data:`FLOW_SECTION`."""
    text = path.read_text() if path.exists() else ""
    i = text.find(FLOW_SECTION)
    return (text, "") if i < 0 else (text[:i].rstrip() + "\n", text[i:])


def _table(rows) -> list[str]:
    lines = ["| objective | seed | base reward | aligned reward | gain ± SE | win rate | train (s) "
             "| wall (s) | peak RSS (MB) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        gain = r["aligned_reward"] - r["base_reward"]
        lines.append(f"| {r['objective']} | {r['seed']} | {r['base_reward']:.4f} | "
                     f"{r['aligned_reward']:.4f} | {gain:+.4f} ± {r['gain_se']:.4f} | {r['win_rate']:.3f} | "
                     f"{r['train_s']} | {r['wall_s']} | {r['peak_rss_mb']} |")
    lines += ["", "Means over seeds:", "",
              "| objective | seeds | base | aligned | gain | win rate | train (s) |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for obj in dict.fromkeys(r["objective"] for r in rows):
        rs = [r for r in rows if r["objective"] == obj]

        def mean(key, rs=rs):
            return sum(r[key] for r in rs) / len(rs)

        lines.append(f"| {obj} | {len(rs)} | {mean('base_reward'):.4f} | {mean('aligned_reward'):.4f} | "
                     f"{mean('aligned_reward') - mean('base_reward'):+.4f} | {mean('win_rate'):.3f} | "
                     f"{mean('train_s'):.0f} |")
    return lines


def write_flow_doc(rows, args):
    """Replace (or add) the flow section of the doc, keeping the U-Net part as it is."""
    import torch

    from diffalign.toy.demo import FLOW_DEMO_DEFAULTS as d

    path = Path(args.doc)
    unet_part, _ = _split_doc(path)
    n_img = 12 * d["eval_images_per_prompt"]
    lines = [
        FLOW_SECTION, "",
        f"Generated by `python scripts/compare_objectives.py --world flow --seeds "
        f"{' '.join(map(str, args.seeds))} --max-steps {args.max_steps} --threads {args.threads}` "
        f"({platform.processor() or platform.machine()}, torch {torch.__version__}, CPU). The same protocol as "
        "above on the toy flow world: `assets/toy-flow` (a `StableDiffusion3Pipeline`: small MMDiT, two small CLIP "
        "encoders, no T5, toy-sd's VAE) and its pairs `assets/toy-flow-pairs`, labelled by the same oracle. "
        f"LoRA r={d['rank']} on the sd3 default targets (joint attention, image and context streams), batch "
        f"{d['batch_size']}, lr {d['learning_rate']:g} constant, {args.max_steps} steps, losses on rectified-flow "
        f"velocity errors (t logit-normal). Held-out prompts: {d['eval_images_per_prompt']} images per prompt "
        f"({n_img} images), the same seeds for base and aligned; sampling 20 Euler steps, CFG 5. The `dpo` rows "
        "are what `diffalign demo --world flow --seed S` runs.", "",
        "Settings per objective: " + "; ".join(f"{k}: `{json.dumps(v)}`" for k, v in FLOW_OBJECTIVES.items()
                                               if k in args.objectives) + ".", "",
        *_table(rows)]
    path.parent.mkdir(exist_ok=True)
    path.write_text(unet_part + "\n" + "\n".join(lines) + "\n")
    print(f"wrote {args.doc}")


def write_doc(rows, args):
    import torch

    lines = [
        "# Objectives compared on the toy world", "",
        f"Generated by `python scripts/compare_objectives.py --seeds {' '.join(map(str, args.seeds))} "
        f"--max-steps {args.max_steps} --threads {args.threads}` ({platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, CPU). Same data (`assets/toy-pairs`), LoRA r=8 on attention + feed-forward + "
        f"proj_in/out, batch 8, lr 1e-3 constant, {args.max_steps} steps, same seeds. Reward: the toy oracle "
        "(`diffalign.toy.oracle_reward`) on the held-out prompts (disjoint from training), 2 images per prompt, the "
        "same generation seeds for base and aligned. Gain = aligned - base, ± its paired standard error over images. "
        "Win rate: aligned beats base on the same prompt and seed (ties count half). Wall time includes "
        "evaluation; peak RSS is the run's own process.", "",
        "Settings per objective: " + "; ".join(f"{k}: `{json.dumps(v)}`" for k, v in OBJECTIVES.items()
                                               if k in args.objectives) + ".", "",
        *_table(rows)]
    lines += ["", "At toy scale the peak RSS is the Python/torch runtime (~1 GB) for every objective, so MaPO's saving "
              "(no reference forward, no reference weights) does not show here; `tests/core/test_mapo.py` counts its "
              "U-Net calls and parameters instead. InPO's training time includes the DDIM inversion of every "
              "winner and loser latent at every step. The `dpo` rows are exactly what `diffalign demo --seed S` "
              "runs."]
    Path(args.doc).parent.mkdir(exist_ok=True)
    _, flow_section = _split_doc(Path(args.doc))
    Path(args.doc).write_text("\n".join(lines) + "\n" + ("\n" + flow_section if flow_section else ""))
    print(f"wrote {args.doc}")


if __name__ == "__main__":
    main()
