"""``diffalign demo``: Diffusion-DPO end to end on the bundled toy world, on a CPU, in minutes.

1. LoRA Diffusion-DPO on the shipped toy pipeline (``assets/toy-sd``) with the shipped oracle-labelled pairs
   (``assets/toy-pairs``), through the same trainer and config as a real run.
2. Base vs. aligned on the held-out prompts (disjoint from the training prompts), same seeds: oracle reward of
   each image, mean rewards and the win rate (ties count half).
3. ``report.json`` (``base_reward``, ``aligned_reward``, ``win_rate``, ``lora_path``, per-prompt figures),
   ``samples.png`` (base row above aligned row, prompt and oracle reward under each image), ``curves.png``
   (training loss against the ln 2 of step 0, and the implicit reward margin), and the
   LoRA in ``pytorch_lora_weights.safetensors`` that ``pipeline.load_lora_weights(out)`` reads.

``--world flow`` runs the same on the toy flow world: LoRA Flow-DPO (DPO on rectified-flow velocity errors) on
``assets/toy-flow`` (a ``StableDiffusion3Pipeline``) with ``assets/toy-flow-pairs``, settings
:data:`FLOW_DEMO_DEFAULTS`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from .components import DEFAULT_FLOW_GUIDANCE_SCALE, DEFAULT_GUIDANCE_SCALE

# Tuned on the toy world (2 CPU cores, ~2 min): the toy latents have 4x8x8 = 256 dims instead of SD1.5's
# 16,384, so per-sample error differences are much noisier and a smaller β (1000) keeps the logits out of
# saturation.
DEMO_DEFAULTS = {
    "max_steps": 150,
    "batch_size": 8,
    "learning_rate": 1e-3,
    "beta": 1000.0,
    "rank": 8,
    "eval_images_per_prompt": 2,
    "target_modules": ["to_k", "to_q", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in",
                       "proj_out"],
}


# The toy flow world (assets/toy-flow): LoRA on the sd3 default targets (the joint attention's image and
# context q/k/v/out, target_modules null). β for mean velocity errors, measured on seed 0 (held-out win rate,
# 150 steps): 50 -> 0.73, 100 -> 0.77, 250 -> 0.76, 1000 -> 0.69 (velocity errors and their differences are
# larger than the U-Net's ε-errors, so a smaller β keeps the logits out of saturation); seed 1: 100 -> 0.79,
# 250 -> 0.71.
FLOW_DEMO_DEFAULTS = {
    "max_steps": 150,
    "batch_size": 8,
    "learning_rate": 1e-3,
    "beta": 100.0,
    "rank": 8,
    "eval_images_per_prompt": 4,
    "target_modules": None,
}
WORLDS = ("sd", "flow")

# Online RL on the toy worlds (``--objective grpo|nft``): the policy samples G images per training prompt and is
# scored by the toy oracle (``--reward``; ``brightness`` is the deliberately hackable one), LoRA on the family's
# default targets. The monitor scores the same rollouts with the held-out metrics and the artefact statistics.
# Learning rates from seed 0 (60 steps, held-out oracle gain): GRPO U-Net 1e-3 -> +0.024, 3e-3 -> +0.048; GRPO flow
# 1e-3 -> +0.120; NFT U-Net 1e-3 -> +0.293.
ONLINE_DEMO_DEFAULTS = {
    "grpo": {"max_steps": 60, "batch_size": 4, "group_size": 8, "learning_rate": 3e-3, "rank": 8,
             "num_inference_steps": 10, "kl_beta": 0.01, "updates_per_rollout": 2},
    "nft": {"max_steps": 60, "batch_size": 4, "group_size": 8, "learning_rate": 1e-3, "rank": 8,
            "num_inference_steps": 10, "kl_beta": 1e-4, "updates_per_rollout": 1},
}
OBJECTIVES = ("dpo", *ONLINE_DEMO_DEFAULTS)


def world_defaults(world: str = "sd") -> dict:
    """:data:`DEMO_DEFAULTS` (``sd``, the U-Net toy world) or :data:`FLOW_DEMO_DEFAULTS` (``flow``)."""
    if world not in WORLDS:
        raise ValueError(f"world must be one of {WORLDS}, got {world!r}")
    return DEMO_DEFAULTS if world == "sd" else FLOW_DEMO_DEFAULTS


def world_paths(world: str = "sd") -> tuple[Path, Path]:
    """(pipeline folder, pairs folder) of a toy world."""
    from . import toy_flow_pairs_path, toy_flow_path, toy_model_path, toy_pairs_path

    world_defaults(world)
    return (toy_model_path(), toy_pairs_path()) if world == "sd" else (toy_flow_path(), toy_flow_pairs_path())


def _run_settings(out_dir: str | Path, seed: int, o: dict) -> dict:
    """The keys every demo run shares: output, budget, seed, logging every step, no checkpoints, constant lr."""
    return {
        "output_dir": str(out_dir),
        "max_steps": o["max_steps"],
        "batch_size": o["batch_size"],
        "seed": seed,
        "log_every": 1,
        "checkpoint_every": None,
        "report_to": None,
        "optimizer": {"learning_rate": o["learning_rate"], "lr_scheduler": "constant", "weight_decay": 0.0},
    }


def online_config(out_dir: str | Path, seed: int = 0, world: str = "sd", objective: str = "grpo",
                  reward: str = "toy", held_out: str | None = None, **overrides) -> dict:
    """The online (GRPO / NFT) config the demo runs: the world's training prompts, ``reward`` as the training
    reward, and what the monitor watches on the held-out prompts (a fixed evaluation set): ``held_out`` scorers, by default the oracle's
    caption fidelity alone (``toy`` with ``taste_weight`` 0: it falls if the policy trades the caption for the
    taste) when training on the oracle, else the whole oracle and the artefact statistics. On the toy images the
    artefact statistics move with the taste (bigger shapes), so the oracle runs log them without watching."""
    model, pairs = world_paths(world)
    o = {**ONLINE_DEMO_DEFAULTS[objective], **overrides}
    guidance = DEFAULT_GUIDANCE_SCALE if world == "sd" else DEFAULT_FLOW_GUIDANCE_SCALE
    if held_out is None:
        held_out = {"toy": {"taste_weight": 0.0}} if reward == "toy" else "toy"
    return {
        "model": {"pretrained": str(model), "lora": {"rank": o["rank"], "alpha": o["rank"], "target_modules": None}},
        "dataset": {"resolution": 32},
        "objective": {"name": objective, "kl_beta": o["kl_beta"]},
        "rollout": {"prompts": str(pairs / "train_prompts.txt"), "rewards": reward, "group_size": o["group_size"],
                    "num_inference_steps": o["num_inference_steps"], "guidance_scale": guidance,
                    "updates_per_rollout": o["updates_per_rollout"]},
        # the fixed evaluation set: the held-out prompts, 2 images each, every 5 steps; thresholds in the
        # metrics' units (rewards in [0, 2] and [0, 1], artefact statistics in [0, 1])
        "monitor": {"held_out": held_out, "prompts": str(pairs / "heldout_prompts.txt"), "every": 5,
                    "images_per_prompt": 2, "window": 3, "patience": 2, "units": "absolute", "min_rise": 0.01,
                    "min_fall": 0.03, "artefacts": "log" if reward == "toy" else "watch"},
        **_run_settings(out_dir, seed, o),
    }


def demo_config(out_dir: str | Path, seed: int = 0, world: str = "sd", **overrides) -> dict:
    """The training config the demo runs (a plain dict, as a YAML file would give)."""
    model, pairs = world_paths(world)
    o = {**world_defaults(world), **overrides}
    return {
        "model": {"pretrained": str(model),
                  "lora": {"rank": o["rank"], "alpha": o["rank"], "target_modules": o["target_modules"]}},
        "dataset": {"source": str(pairs), "resolution": 32, "random_flip": False},
        "objective": o.get("objective") or {"name": "dpo", "beta": o["beta"]},
        **_run_settings(out_dir, seed, o),
    }


def evaluate(pipe, prompts: list[str], seeds: list[int]) -> tuple[np.ndarray, list]:
    """Oracle reward of one image per (prompt, seed), each from its own ``torch.Generator("cpu").manual_seed(seed)``
    (:func:`diffalign.toy.generate`); returns rewards (N,) and the images."""
    from . import generate, oracle_reward

    images = generate(pipe, prompts, seeds)
    return np.asarray(oracle_reward(images, prompts), dtype=np.float64), images


def win_rate(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of items where ``a`` beats ``b``, ties counting half."""
    return float(np.mean((a > b) + 0.5 * (a == b)))


def run_demo(out_dir: str | Path = "runs/demo", seed: int = 0, quiet: bool = False, world: str = "sd",
             online: str | None = None, reward: str = "toy", held_out: str | None = None, **overrides) -> dict:
    """Train, then compare base and aligned on the held-out prompts. ``online``: ``"grpo"`` or ``"nft"`` trains
    online against ``reward`` (the monitor watching ``held_out``) instead of DPO on the pairs."""
    from ..inference import load_pipeline
    from ..training.config import parse_config
    from ..training.trainer import trainer_class
    from . import heldout_prompts

    out_dir = Path(out_dir)
    start = time.time()
    raw = (online_config(out_dir, seed, world, online, reward, held_out, **overrides) if online
           else demo_config(out_dir, seed, world, **overrides))
    cfg = parse_config(raw)
    trainer = trainer_class(cfg)(cfg).setup(overwrite=True)  # SePPO and InPO need their recipes
    trainer.train()
    trainer.cleanup()
    train_seconds = time.time() - start

    k = overrides.get("eval_images_per_prompt", world_defaults(world)["eval_images_per_prompt"])
    prompts = [p for p in heldout_prompts() for _ in range(k)]
    seeds = [10_000 * seed + i for i in range(len(prompts))]
    model = str(world_paths(world)[0])
    base, base_images = evaluate(load_pipeline(str(model), device="cpu"), prompts, seeds)
    aligned, aligned_images = evaluate(load_pipeline(str(model), str(out_dir), device="cpu"),
                                        prompts, seeds)

    report = {
        "world": world,
        "seed": seed,
        "base_reward": float(base.mean()),
        "aligned_reward": float(aligned.mean()),
        "win_rate": win_rate(aligned, base),
        "num_heldout_images": len(prompts),
        "lora_path": str(out_dir / "pytorch_lora_weights.safetensors"),
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.time() - start, 1),
        "config": cfg.to_dict(),
        "per_image": [{"prompt": p, "seed": s, "base": float(b), "aligned": float(a)}
                      for p, s, b, a in zip(prompts, seeds, base, aligned)],
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    n = min(16, len(prompts))
    _plot_samples(base_images[:n], aligned_images[:n], prompts[:n], base[:n], aligned[:n],
                  out_dir / "samples.png")
    if online:
        report["reward"] = reward
        report["monitor_flags"] = [{"step": st, "reason": why} for st, why in trainer.monitor.history]
        (out_dir / "report.json").write_text(json.dumps(report, indent=2))
        plot_online_curves(trainer.history, out_dir / "curves.png", reward)
    else:
        _plot_curves(trainer.history, out_dir / "curves.png")
    if not quiet:
        print(f"base reward {report['base_reward']:.4f}  aligned reward {report['aligned_reward']:.4f}  "
              f"win rate {report['win_rate']:.1%} on {len(prompts)} held-out images")
        if online and report["monitor_flags"]:
            print(f"reward-hacking monitor flagged: {report['monitor_flags'][0]['reason']}")
        print(f"wrote {out_dir / 'report.json'}, samples.png, curves.png; LoRA: {report['lora_path']}")
    return report


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_samples(base_images, aligned_images, prompts, base, aligned, path: Path):
    """Base row above aligned row, the same prompt and seed in each column; prompt and oracle rewards
    below."""
    import textwrap

    plt = _pyplot()
    n = len(prompts)
    fig, axes = plt.subplots(2, n, figsize=(1.0 * n + 0.8, 3.3), squeeze=False)
    for j in range(n):
        for i, (img, r) in enumerate(((base_images[j], base[j]), (aligned_images[j], aligned[j]))):
            ax = axes[i][j]
            ax.imshow(img.resize((64, 64)))
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{r:+.2f}", fontsize=6, pad=2)
        axes[1][j].set_xlabel("\n".join(textwrap.wrap(prompts[j], 16)), fontsize=5)
    axes[0][0].set_ylabel("base", fontsize=8)
    axes[1][0].set_ylabel("aligned", fontsize=8)
    fig.suptitle("held-out prompts, same seed per column; number above an image: its toy-oracle reward",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_curves(history: list[dict], path: Path):
    plt = _pyplot()
    steps = [h["step"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))

    def smooth(xs, k=10):
        xs = np.asarray(xs, dtype=float)
        return np.convolve(xs, np.ones(k) / k, mode="valid") if len(xs) >= k else xs

    for ax, key, title in ((ax1, "loss", "DPO loss"), (ax2, "rewards/margins", "implicit reward margin")):
        vals = [h.get(key, float("nan")) for h in history]  # an objective may not log a margin
        ax.plot(steps, vals, alpha=0.3, color="C0", label="per step")
        sm = smooth(vals)
        ax.plot(steps[len(steps) - len(sm):], sm, color="C0", label="mean of 10 steps")
        ax.set_title(title)
        ax.set_xlabel("step")
    ax1.axhline(np.log(2), ls="--", color="gray", lw=0.8,
                label="ln 2: the loss while policy = reference (step 0)")
    ax2.axhline(0.0, ls="--", color="gray", lw=0.8, label="0: no preference learned")
    ax1.legend(fontsize=7, loc="upper right")
    ax2.legend(fontsize=7, loc="upper left")
    fig.text(0.01, 0.01, "Why the loss sits above ln 2 while the margin rises: each pair is scored at one "
             "random (t, ε), so its logit is noisy, and the mean of -log σ(logit) over noisy logits exceeds "
             "ln 2 even when they average above 0 (-log σ is convex). The margin (right) and the held-out "
             "win rate show learning.",
             fontsize=6.5, color="dimgray", wrap=True)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_online_curves(history: list[dict], path: Path, reward: str = "toy"):
    """Left: the training reward per step (and on the fixed evaluation set, ``eval/reward``); middle: the held-out
    scorers; right: the artefact statistics, each divided by its first value: on the evaluation set when the run
    has one (``eval/...``), else on the rollouts; red marks: steps the monitor was flagged."""
    plt = _pyplot()
    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(steps, [h.get("reward", float("nan")) for h in history], color="C0", alpha=0.4,
                 label="rollouts (prompts change every step)")
    evaluated = [h for h in history if "eval/reward" in h]
    if evaluated:
        axes[0].plot([h["step"] for h in evaluated], [h["eval/reward"] for h in evaluated], "o-", color="C0",
                     label="fixed evaluation set")
        axes[0].legend(fontsize=7)
    axes[0].set_title(f"training reward ({reward})")
    where = "fixed evaluation set" if evaluated else "same rollouts"
    rows = evaluated or history
    for ax, prefix, title in ((axes[1], "heldout/", f"held-out scorers, {where}"),
                              (axes[2], "artefact/", f"artefact statistics / first value, {where}")):
        prefix = f"eval/{prefix}" if evaluated else prefix
        keys = sorted({k for h in rows for k in h if k.startswith(prefix)})
        for i, key in enumerate(keys):
            vals = np.array([h.get(key, np.nan) for h in rows], dtype=float)
            if "artefact/" in prefix:
                vals = vals / max(abs(vals[0]), 1e-12)
            ax.plot([h["step"] for h in rows], vals, "o-" if evaluated else "-", color=f"C{i + 1}",
                    label=key[len(prefix):])
        if keys:
            ax.legend(fontsize=7)
        ax.set_title(title)
    for ax in axes:
        flagged = [h["step"] for h in history if h.get("monitor/flagged")]
        for st in flagged:
            ax.axvline(st, color="red", alpha=0.08, lw=2)
        ax.set_xlabel("step")
    fig.suptitle("online run: red background = steps the reward-hacking monitor was flagged", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="diffalign demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--world", choices=WORLDS, default="sd",
                   help="sd: the U-Net toy world (assets/toy-sd, toy-pairs); flow: the SD3-style toy world "
                        "(assets/toy-flow, toy-flow-pairs), Flow-DPO")
    p.add_argument("--objective", choices=OBJECTIVES, default="dpo",
                   help="dpo: Diffusion-DPO / Flow-DPO on the shipped pairs; grpo, nft: online RL against --reward "
                        "on the policy's own samples")
    p.add_argument("--reward", default="toy",
                   help="online: the training reward (default toy, the oracle; brightness is deliberately hackable "
                        "and shows the monitor flagging the run)")
    p.add_argument("--max-steps", type=int, default=None, help="default: the world's (150; online 60)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a 2-core machine more threads are slower, up to "
                        "10x when the machine is busy; the README's figures are on 1 thread)")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    if args.objective == "dpo":
        steps = args.max_steps or world_defaults(args.world)["max_steps"]
        run_demo(args.out, args.seed, world=args.world, max_steps=steps)
    else:
        steps = args.max_steps or ONLINE_DEMO_DEFAULTS[args.objective]["max_steps"]
        run_demo(args.out, args.seed, world=args.world, online=args.objective, reward=args.reward, max_steps=steps)
    return 0
