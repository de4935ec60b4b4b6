"""Online RL bench: where a GRPO / DiffusionNFT training step spends its time, per world.

    python bench/online.py --worlds toy,toy-flow,sd15,sd35m --objectives grpo,nft --steps 3 --warmup 1 \\
        --threads 1 --out bench/results/online.json

Each (world, objective) pair is a short real run of :class:`diffalign.training.online.GRPOTrainer` or
:class:`~diffalign.training.online.NFTTrainer` (``train()``, ``warmup + steps`` training steps, in a fresh
process by default) with the config :func:`diffalign.toy.demo.online_config` builds, resized per world
(:data:`WORLDS`).
What is measured, from the trainer's own per-step record (``trainer.history``) after the warm-up steps:

* the phases: ``time/sample`` (text encoding, rollout, VAE decode), ``time/score`` (reward, held-out scorers,
  artefact statistics), ``time/train`` (advantages, re-scoring with gradient, optimizer updates);
* the step: wall and process CPU time (``time.process_time``, all threads) between two consecutive step
  records (``on_record``), less the monitor's fixed-set evaluation when the step ran one
  (``monitor.prompts``: step 1, then every ``monitor.every`` steps), which is timed on its own (``eval_s``,
  per evaluation). ``other_s`` = step - (sample + score + train): next batch, lr scheduler, NFT's old-policy
  update, the monitor, the log line. On a machine shared with other jobs CPU time is the steadier figure
  (with one thread, wall / CPU shows the wait);
* per step medians: seconds per rollout image = ``time/sample`` / images per step (prompts x group size);
  seconds per optimizer update = ``time/train`` / updates in the step (the increase of the record's
  ``updates``);
* shares: ``sample_share`` = Σ time/sample / Σ (sample + score + train) over the measured steps, the same for
  score and train, so the three sum to 1 by construction; ``other_share`` = Σ other / Σ step wall, apart;
* peak memory: ``ru_maxrss`` of the process at the end of the run (a fresh process per pair unless
  ``--isolation none``, then the whole calling process so far); on cuda ``torch.cuda.max_memory_allocated``.

Worlds: ``toy`` / ``toy-flow`` = the shipped toy pipelines (``diffalign/assets/toy-sd``, ``toy-flow``) with
the toy oracle as reward and the demo's sizes and monitor (a fixed evaluation set of the held-out prompts);
``sd15`` / ``sd35m`` = the random-weight full-size-shaped components of :mod:`bench.worlds` (SD1.5-shaped;
SD3.5-M-shaped with 4 of 24 transformer blocks) at a CPU resolution, with the cheap in-process ``brightness``
reward (random weights: a real reward model adds its own time, not measured here), the toy oracle as held-out
scorer, and the monitor on the rollouts (no evaluation set) as in ``configs/*_grpo_pickscore.yaml``. Prompts:
the toy training prompts on every world. fp32 unless ``--mixed-precision``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``bench`` and ``diffalign`` importable from the repo
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.measure import GIB, loadavg, machine_info, peak_rss_gib, run_isolated

ROOT = Path(__file__).resolve().parents[1]
OBJECTIVES = ("grpo", "nft")
# Per world: the demo world whose config and prompts it starts from, the reward, and the sizes of a step.
# LoRA, CFG and monitor (on the rollouts: no evaluation set) of the full-size worlds follow
# configs/sd15_grpo_pickscore.yaml and configs/sd35m_grpo_pickscore.yaml; the toy worlds keep the demo's
# (diffalign.toy.demo.online_config).
WORLDS = {
    "toy": {"demo": "sd", "reward": "toy", "resolution": 32, "batch_size": 4, "group_size": 8,
            "num_inference_steps": 10},
    "toy-flow": {"demo": "flow", "reward": "toy", "resolution": 32, "batch_size": 4, "group_size": 8,
                 "num_inference_steps": 10},
    "sd15": {"demo": "sd", "reward": "brightness", "resolution": 128, "batch_size": 2, "group_size": 2,
             "num_inference_steps": 4, "lora": {"rank": 16, "alpha": 16}, "guidance_scale": 5.0,
             "eval_set": False},
    "sd35m": {"demo": "flow", "reward": "brightness", "resolution": 256, "batch_size": 2, "group_size": 2,
              "num_inference_steps": 4, "lora": {"rank": 32, "alpha": 64}, "guidance_scale": 4.5,
              "eval_set": False},
}
SIZE_KEYS = ("resolution", "batch_size", "group_size", "num_inference_steps")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worlds", default="toy,toy-flow,sd15,sd35m", help=f"comma list of {', '.join(WORLDS)}")
    p.add_argument("--objectives", default="grpo,nft", help="comma list of grpo, nft")
    p.add_argument("--steps", type=int, default=3, help="measured training steps per run")
    p.add_argument("--warmup", type=int, default=1, help="training steps run first and dropped")
    p.add_argument("--threads", type=int, default=1, help="torch threads (and OMP_NUM_THREADS) per run")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--mixed-precision", default="no", choices=("no", "fp16", "bf16"))
    p.add_argument("--resolution", type=int, help="image size of every world (default: the world's, WORLDS)")
    p.add_argument("--batch-size", type=int, help="prompts per step (default: the world's)")
    p.add_argument("--group-size", type=int, help="images per prompt (default: the world's)")
    p.add_argument("--num-inference-steps", type=int, help="sampling steps (default: the world's)")
    p.add_argument("--isolation", default="process", choices=("process", "none"),
                   help="process: each run in a fresh process (its own peak RSS); none: in this process")
    p.add_argument("--workdir", default="/tmp/diffalign-bench/online", help="run folders and job logs")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "online.json"))
    args = p.parse_args(argv)
    args.worlds = [w for w in args.worlds.split(",") if w]
    args.objectives = [o for o in args.objectives.split(",") if o]
    for w in args.worlds:
        if w not in WORLDS:
            p.error(f"--worlds: unknown world {w!r} (one of {', '.join(WORLDS)})")
    for o in args.objectives:
        if o not in OBJECTIVES:
            p.error(f"--objectives: unknown objective {o!r} (one of {', '.join(OBJECTIVES)})")
    return args


def sizes(world: str, args) -> dict:
    """The world's step sizes with the command line's overrides."""
    chosen = {k: WORLDS[world][k] for k in SIZE_KEYS}
    chosen.update({k: getattr(args, k) for k in SIZE_KEYS if getattr(args, k) is not None})
    return chosen


def config(world: str, objective: str, size: dict, max_steps: int, out_dir: str, mixed_precision: str = "no"):
    """The run's config dict: :func:`diffalign.toy.demo.online_config` of the world's demo world, resized."""
    from diffalign.toy.demo import online_config

    w = WORLDS[world]
    raw = online_config(out_dir, 0, w["demo"], objective, w["reward"], max_steps=max_steps,
                        batch_size=size["batch_size"], group_size=size["group_size"],
                        num_inference_steps=size["num_inference_steps"])
    raw["dataset"]["resolution"] = size["resolution"]
    raw["mixed_precision"] = mixed_precision
    if "lora" in w:
        raw["model"]["lora"].update(w["lora"])
    if "guidance_scale" in w:
        raw["rollout"]["guidance_scale"] = w["guidance_scale"]
    if w.get("eval_set") is False:  # the monitor watches the rollouts
        for key in ("prompts", "every", "images_per_prompt"):
            raw["monitor"].pop(key, None)
    return raw


def components(world: str):
    """Random-weight components of a full-size world; ``None`` for the toy worlds (read from disk)."""
    from bench import worlds

    return {"sd15": worlds.sd15_components, "sd35m": worlds.sd35m_components}.get(world, lambda: None)()


def run_one(world: str, objective: str, size: dict, steps: int, warmup: int, workdir: str,
            device: str = "cpu", mixed_precision: str = "no") -> dict:
    """One short training run; returns its sizes, each step's timings and the summary (:func:`summarize`)."""
    import torch

    from diffalign.training.config import parse_config
    from diffalign.training.trainer import trainer_class

    if device == "cpu" and torch.cuda.is_available():
        os.environ["ACCELERATE_USE_CPU"] = "true"  # the trainer's Accelerator would pick the GPU
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    load = loadavg()
    out_dir = str(Path(workdir) / f"{world}-{objective}")
    cfg = parse_config(config(world, objective, size, warmup + steps, out_dir, mixed_precision))
    start = time.perf_counter()
    built = components(world)
    trainer = trainer_class(cfg)(cfg, built).setup(overwrite=True)
    setup_s = time.perf_counter() - start
    clocks = _step_clocks(trainer, cuda)
    trainer.train()
    trainer.cleanup()
    r = cfg.rollout
    result = {
        "world": world, "objective": objective, "source": trainer.components.source, "reward": r.rewards,
        "held_out": cfg.monitor.held_out, "guidance_scale": r.guidance_scale, "sizes": size,
        "images_per_step": cfg.batch_size * r.group_size, "updates_per_rollout": r.updates_per_rollout,
        "lora_rank": cfg.model.lora.rank, "mixed_precision": mixed_precision,
        "device": str(trainer.accelerator.device), "setup_s": setup_s,
        "trainable_params": sum(p.numel() for p in trainer.trainable_parameters()),
        "steps": _steps(trainer.history, clocks), "warmup": warmup, "loadavg_start": load,
        "loadavg_end": loadavg(),
        "nonfinite_skipped": trainer.nonfinite_skipped, "peak_rss_gib": peak_rss_gib(),
        "peak_cuda_gib": torch.cuda.max_memory_allocated() / GIB if cuda else None,
    }
    result.update(summarize(result["steps"][warmup:], result["images_per_step"]))
    evals = [s["eval_s"] for s in result["steps"] if s["eval_s"] > 0]  # warm-up included: step 1 has one
    result.update(eval_s=statistics.median(evals) if evals else None, evaluations=len(evals),
                  eval_every=cfg.monitor.every if cfg.monitor.prompts else None,
                  eval_images=len(trainer.eval_prompts) * cfg.monitor.images_per_prompt if cfg.monitor.prompts
                  else None)
    return result


def _step_clocks(trainer, cuda: bool) -> list[dict]:
    """Per recorded step: wall and process CPU seconds between consecutive ``on_record`` calls (the first from
    now), after the monitor has seen the record, and those of the fixed-set evaluation it ran, if any."""
    import torch

    def clock():
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter(), time.process_time()

    clocks, last, spent = [], [clock()], {}
    on_record, evaluate = trainer.on_record, getattr(trainer, "evaluate", None)

    def timed_evaluate():
        t0 = clock()
        out = evaluate()
        t1 = clock()
        spent.update(eval_s=t1[0] - t0[0], eval_cpu_s=t1[1] - t0[1])
        return out

    def stamped(record):
        spent.clear()
        on_record(record)
        now = clock()
        clocks.append({"wall_s": now[0] - last[0][0], "cpu_s": now[1] - last[0][1], "eval_s": 0.0,
                       "eval_cpu_s": 0.0, **spent})
        last[0] = now

    trainer.on_record = stamped
    if evaluate is not None:
        trainer.evaluate = timed_evaluate
    return clocks


def _steps(history: list[dict], clocks: list[dict]) -> list[dict]:
    """Each step's phases, wall and CPU time without the evaluation (timed apart), and optimizer updates (the
    increase of the record's running count)."""
    out, before = [], 0.0
    for record, c in zip(history, clocks, strict=True):
        phases = {f"{k}_s": record[f"time/{k}"] for k in ("sample", "score", "train")}
        wall, cpu = c["wall_s"] - c["eval_s"], c["cpu_s"] - c["eval_cpu_s"]
        out.append({"step": record["step"], "wall_s": wall, "cpu_s": cpu, **phases,
                    "other_s": wall - sum(phases.values()), "eval_s": c["eval_s"],
                    "updates": record["updates"] - before, "reward": record.get("reward")})
        before = record["updates"]
    return out


def summarize(steps: list[dict], images_per_step: int) -> dict:
    """Medians per step, seconds per rollout image and per update, the shares (the module docstring)."""

    def med(key):
        return statistics.median(s[key] for s in steps)

    accounted = sum(s["sample_s"] + s["score_s"] + s["train_s"] for s in steps)
    per_update = [s["train_s"] / s["updates"] for s in steps if s["updates"] > 0]
    return {
        "measured_steps": len(steps), "step_s": med("wall_s"), "step_cpu_s": med("cpu_s"),
        "sample_s": med("sample_s"), "score_s": med("score_s"), "train_s": med("train_s"),
        "other_s": med("other_s"),
        "updates_per_step": med("updates"),
        "s_per_image": statistics.median(s["sample_s"] / images_per_step for s in steps),
        "s_per_update": statistics.median(per_update) if per_update else None,
        **{f"{k}_share": sum(s[f"{k}_s"] for s in steps) / accounted for k in ("sample", "score", "train")},
        "other_share": sum(s["other_s"] for s in steps) / sum(s["wall_s"] for s in steps),
    }


def markdown(results: dict) -> str:
    gpu = results["meta"]["device"] != "cpu"
    head = ["world", "objective", "px", "prompts x images", "sampling steps", "step s", "step CPU s",
            "s / rollout image", "updates / step", "s / update", "sample", "score", "train", "other s",
            "eval s (images, every)", "peak RSS GiB"]
    head += ["peak GPU GiB"] if gpu else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results["runs"]:
        z = r.get("sizes", {})
        cells = [r["world"], r["objective"], z.get("resolution"),
                 f"{z.get('batch_size')} x {z.get('group_size')}", z.get("num_inference_steps")]
        if r.get("status", "ok") != "ok":
            cells += [f"{r['status']}: {str(r.get('error', ''))[:60]}"] + [""] * (len(head) - 6)
        else:
            cells += [_f(r["step_s"]), _f(r["step_cpu_s"]), _f(r["s_per_image"]),
                      _f(r["updates_per_step"], 0), _f(r["s_per_update"])]
            cells += [f"{r[f'{k}_share']:.0%}" for k in ("sample", "score", "train")]
            cells += [_f(r["other_s"]), _eval_cell(r), _f(r["peak_rss_gib"], 2)]
            cells += [_f(r["peak_cuda_gib"], 2)] if gpu else []
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def _eval_cell(r: dict) -> str:
    if not r.get("eval_every"):
        return "none"
    return f"{_f(r['eval_s'])} ({r['eval_images']}, {r['eval_every']})"


def _f(x, nd=3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.{nd}f}" if abs(x) < 10 or nd == 0 else f"{x:.1f}"


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # read when torch starts (here or in the forkserver)
    os.environ.setdefault("TQDM_DISABLE", "1")
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    started = time.time()
    results = {"meta": {
        "command": "python bench/online.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": _commit(),
        "machine": machine_info(args.device),
        "threads": args.threads, "device": args.device, "isolation": args.isolation, "steps": args.steps,
        "warmup": args.warmup, "mixed_precision": args.mixed_precision, "loadavg_start": loadavg()},
        "runs": []}
    for world in args.worlds:
        for objective in args.objectives:
            size = sizes(world, args)
            print(f"[{world} {objective}] {size['resolution']} px, {size['batch_size']} prompts x "
                  f"{size['group_size']} images, {size['num_inference_steps']} sampling steps, reward "
                  f"{WORLDS[world]['reward']}, {args.warmup} + {args.steps} steps, {args.threads} thread(s), "
                  f"load {loadavg()}", flush=True)
            kwargs = {"world": world, "objective": objective, "size": size, "steps": args.steps,
                      "warmup": args.warmup, "workdir": args.workdir, "device": args.device,
                      "mixed_precision": args.mixed_precision}
            if args.isolation == "process":
                log = str(Path(args.workdir) / f"{world}-{objective}.log")
                run = run_isolated("bench.online:run_one", kwargs, threads=args.threads, log_path=log)
            else:
                import torch

                torch.set_num_threads(args.threads)
                run = dict(run_one(**kwargs), status="ok")
            run.setdefault("world", world)
            run.setdefault("objective", objective)
            run.setdefault("sizes", size)
            results["runs"].append(run)
            _write(Path(args.out), results)
    results["meta"].update(loadavg_end=loadavg(), wall_s=time.time() - started)
    _write(Path(args.out), results)
    print()
    print(markdown(results))
    print(f"\nwrote {args.out} in {time.time() - started:.0f} s; {args.threads} thread(s); load average now "
          f"{loadavg()}")
    return results


def _commit() -> str | None:
    """The repository's HEAD, with ``+dirty`` when the working tree differs from it (``None`` outside git)."""
    import subprocess

    try:
        def git(*cmd):
            return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, check=True).stdout

        head, dirty = git("rev-parse", "HEAD").strip(), git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty.strip() else "")


def _write(path: Path, results: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
