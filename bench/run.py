"""diffalign's training-step benchmark: ours against the official Diffusion-DPO and the diffusers DPO strategies.

    python bench/run.py --quick                 # toy world only, < 5 min on 2 CPU cores -> bench/results/quick.json
    python bench/run.py                         # toy + SD1.5-shaped (512 px) -> bench/results/full.json (hours on CPU)
    python bench/run.py --configs sd15 --sections strategies --out bench/results/sd15.json
    python bench/run.py --device cuda           # GPU: pairs/s, torch.cuda.max_memory_allocated, MFU
    python bench/run.py --report bench/results/full.json   # print the markdown tables of a results file
    python bench/run.py --configs sd35m --sections flow --out bench/results/sd35m-flow.json  # flow_grpo/ours
    python bench/run.py --peers PATH/train_diffusion_dpo.py,PATH/train.py  # the real scripts, unmodified

Sections (``--sections``, default all):

* ``strategies``: official / diffusers / ours (first epoch = cache miss, cached = epoch 2+) on the same config,
  batch, dtype (fp32) and seed. Time: the median of N steps after warm-up, strategies interleaved step by step in
  one process (order rotated per repetition) where they fit in memory, and also each in its own fresh process.
  Peak memory: CPU, ``ru_maxrss`` of the fresh process that ran only that configuration; GPU,
  ``torch.cuda.max_memory_allocated``. FLOPs per step from ``torch.utils.flop_counter.FlopCounterMode``.
* ``ablations``: each optimisation on/off around the ours step, alternating in one process.
* ``compile``: ``torch.compile`` of the U-Net, in its own process under ``--compile-timeout``.
* ``epochs``: the real ``PreferenceTrainer.train()`` loop on the toy world, epoch 1 (cache fills) vs epoch 2+.
* ``evaluators``: images/s of each scorer per batch size, on the tiny scorer configs.
* ``profile``: ``torch.profiler`` top ops of the ours step (cached and first epoch); runs inside ``ablations``.
* ``flow``: on the flow worlds (``sd35m``, ``sd3_tiny``): flow_grpo's Flow-DPO step (``flow_grpo``: VAE +
  three text encoders every step, two LoRA adapters learner/ref; ``flow_grpo_body``: the same on precomputed
  inputs) against ours (first epoch / cached), same components, β, seed, batch, fp32. Time interleaved in
  one process, peak RSS from one fresh process per strategy (``bench/flow_strategies.py``). ``strategies`` on
  a flow world runs this section; the U-Net sections do not apply to flow worlds.

Threads: ``--threads`` (default 1) sets ``torch.set_num_threads`` in every job. On a machine shared with other
workers, two OpenMP threads on two busy cores spin-wait on each other (toy steps went from 0.4 s to 2-20 s), so
one thread is the reproducible setting; use ``--threads 2`` (or more) on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``bench`` and ``diffalign`` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import peers
from bench.measure import PhasePeak, loadavg, machine_info, median, ratio, run_isolated
from bench.worlds import FLOW_WORLDS

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("strategies", "ablations", "compile", "epochs", "evaluators", "profile", "flow")
STRATS = ("official", "diffusers", "ours_first_epoch", "ours_cached")
# Isolated jobs run in this order: ours_cached reads the cache ours_first_epoch filled; the official strategy, the
# largest (two full U-Nets + AdamW state), goes last so that a kill for memory loses nothing else.
ISOLATED_ORDER = ("diffusers", "ours_first_epoch", "ours_cached", "official", "official_sgd")
# Measurement aids for a machine where the official strategy does not fit (run on request, --strategies):
# ``official_sgd`` = the official step with a stateless SGD instead of AdamW, ``optimizer_step`` = AdamW.step and
# SGD.step timed over the same parameters; together they rebuild the official step time.
AIDS = ("official_sgd", "optimizer_step")
DEFINITIONS = {
    "official": "SalesforceAIResearch/DiffusionDPO train.py strategy: full fine-tuning, second full frozen U-Net as "
                "reference called separately, winner+loser batched, VAE + text encoder every step",
    "diffusers": "diffusers train_diffusion_dpo.py strategy: LoRA r=8, reference = adapters disabled, winner+loser "
                 "batched, VAE + text encoder every step",
    "ours_first_epoch": "diffalign PreferenceTrainer step, cache miss (first epoch: VAE + text encoder run, cache filled)",
    "ours_cached": "diffalign PreferenceTrainer step, cache hit (epoch 2+: no VAE, no text encoder) = 'ours'",
    "ours_vs_<baseline>_time_ratio": "median step time of ours_cached / that of the baseline (< 1: ours faster)",
    "ours_first_epoch_vs_<baseline>_time_ratio": "the same for the first-epoch (cache miss) step",
    "ours_vs_<baseline>_peak_rss_ratio": "peak RSS of the ours_cached process / the baseline's process (CPU)",
    "flow_grpo": "yifan123/flow_grpo scripts/train_sd3_dpo.py @ ac4c86e Flow-DPO loop body on offline pairs: "
                 "VAE encode + CLIP-L/CLIP-G/T5 every step, LoRA r=32 a=64 adapters learner (trained) + ref "
                 "(frozen, set_adapter), winner+loser batched, beta=100, EMA every 8 steps",
    "flow_grpo_body": "the same loop body on latents/embeddings computed once per batch (what the online "
                      "script trains on: its sampler supplies them); interleaved timing only",
    "ours_vs_flow_grpo_time_ratio": "median step of ours_cached / median step of flow_grpo, interleaved "
                                    "(< 1: ours faster); *_paired_median: median of the per-repetition "
                                    "ratios; *_cpu_time_ratio: the same on process CPU time",
    "ours_vs_flow_grpo_peak_rss_ratio": "peak RSS of the ours_cached process / the flow_grpo process (CPU; "
                                        "GPU: torch.cuda.max_memory_allocated)",
}
FLOW_STRATS = ("flow_grpo", "flow_grpo_body", "ours_first_epoch", "ours_cached")
# ours_cached reads the cache ours_first_epoch filled; flow_grpo_body's memory is flow_grpo's (run on request)
FLOW_ISOLATED = ("flow_grpo", "ours_first_epoch", "ours_cached")
# Dense peak FLOP/s for MFU (vendor datasheets, SXM parts). fp32 training on GPU uses TF32 tensor cores when
# torch.backends.cuda.matmul.allow_tf32 is set; otherwise the plain fp32 peak.
PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "tf32": 494.5, "fp32": 67.0},
    "H100": {"bf16": 989.0, "tf32": 494.5, "fp32": 67.0},
    "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "L40S": {"bf16": 362.0, "tf32": 183.0, "fp32": 91.6},
    "A10G": {"bf16": 70.0, "tf32": 35.0, "fp32": 31.2},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n")[2:8]))
    p.add_argument("--quick", action="store_true", help="toy world only, few repetitions (< 5 min on 2 cores)")
    p.add_argument("--configs", default=None, help="comma list of toy,sd15,sd35m,sd3_tiny (default: toy with "
                   "--quick, else toy,sd15; sd35m/sd3_tiny are the flow worlds of --sections flow)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {','.join(SECTIONS)}")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per strategy/variant")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up steps per job")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads in every job")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--isolation", choices=("process", "none"), default="process",
                   help="process: every configuration in a fresh process (peak RSS = ru_maxrss); none: all in this "
                        "process, peak = VmHWM reset per job (tests)")
    p.add_argument("--compile-timeout", type=float, default=None, help="seconds allowed for the torch.compile job")
    p.add_argument("--ablations", default=None, help="comma list of ablation names (default: all)")
    p.add_argument("--strategies", default=None,
                   help=f"comma list of strategies to run in isolated processes (default: all of {STRATS})")
    p.add_argument("--no-interleaved", action="store_true", help="skip the interleaved-timing job")
    p.add_argument("--ablation-first", choices=("on", "off"), default="on",
                   help="variant that runs first in even repetitions (merge an 'on' and an 'off' run to balance)")
    p.add_argument("--resume", action="store_true",
                   help="reuse the results of jobs already finished with the same arguments (<workdir>/jobs/)")
    p.add_argument("--workdir", default=os.environ.get("DIFFALIGN_BENCH_WORKDIR", "/tmp/diffalign-bench"),
                   help="scratch folder: data, caches, run outputs")
    p.add_argument("--out", default=None, help="JSON output (default bench/results/{quick,full}.json)")
    p.add_argument("--peak-tflops", type=float, default=None, help="GPU peak for MFU, overrides the built-in table")
    p.add_argument("--report", default=None, help="print the markdown tables of an existing results JSON and exit")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="merge results files (later files win per config/section) into --out, print the tables")
    peers.add_arguments(p)
    return p.parse_args(argv)


class Plan:
    """Repetitions and sizes per world; ``--quick`` shrinks everything that is not the toy world."""

    def __init__(self, args):
        self.quick = args.quick
        self.configs = (args.configs or ("toy" if args.quick else "toy,sd15")).split(",")
        self.sections = set(args.sections.split(","))
        unknown = self.sections - set(SECTIONS)
        if unknown:
            raise SystemExit(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
        self.args = args

    def reps(self, world: str, what: str) -> int:
        if self.args.reps is not None:
            return self.args.reps
        if world in ("sd35m", "sd3_tiny"):
            return {"strategies": 4, "isolated": 2}.get(what, 1) if world == "sd35m" else 2
        if world == "toy":
            return {"strategies": 5, "isolated": 3, "ablations": 3, "compile": 3}[what] if self.quick else \
                {"strategies": 10, "isolated": 5, "ablations": 6, "compile": 5}[what]
        return {"strategies": 2, "isolated": 2, "ablations": 1, "compile": 2}[what]

    def num_pairs(self, world: str) -> int:
        # enough distinct batches that every cache-miss step sees pairs never seen before
        b = {"toy": 8, "sd3_tiny": 2}.get(world, 1)
        r = max(self.reps(world, w) for w in ("strategies", "isolated", "ablations"))
        return b * max(16, 2 * r + self.args.warmup + 6)

    def compile_timeout(self, world: str) -> float:
        if self.args.compile_timeout is not None:
            return self.args.compile_timeout
        return 60.0 if self.quick else (300.0 if world == "toy" else 1800.0)


def job_record_path(args, fn: str, kwargs: dict) -> Path:
    """Where a job's result is kept, keyed by the job and its arguments (``--resume`` reads it back)."""
    import hashlib

    key = hashlib.sha1(json.dumps([fn, kwargs], sort_keys=True, default=str).encode()).hexdigest()[:12]
    tag = "-".join(str(kwargs.get(k)) for k in ("world", "strategy") if kwargs.get(k))
    return Path(args.workdir) / "jobs" / f"{fn}-{tag}-{key}.json"


def run_job(args, fn: str, kwargs: dict, timeout=None) -> dict:
    """One job in a fresh process (``--isolation process``) or in this one (``none``).

    Every finished job's result is written under ``<workdir>/jobs/``; with ``--resume`` a job whose record exists
    (status ok or killed) is not run again, so a long run cut short by an outside signal loses only the running job.
    """
    print(f"  - {fn} {json.dumps({k: v for k, v in kwargs.items() if k != 'workdir'})}", flush=True)
    record = job_record_path(args, fn, kwargs)
    if getattr(args, "resume", False) and record.exists():
        out = json.loads(record.read_text())
        if out.get("status") in ("ok", "killed"):
            print(f"    resumed from {record} ({out.get('status')})", flush=True)
            return dict(out, resumed_from=str(record))
    start = time.perf_counter()
    if args.isolation == "process":
        logs = Path(args.workdir) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log = logs / f"{datetime.now().strftime('%H%M%S')}-{fn}-{kwargs.get('world', '')}-{kwargs.get('strategy', '')}.log"
        out = run_isolated(f"bench.jobs:{fn}", kwargs, threads=args.threads, timeout=timeout, log_path=str(log))
        out["peak_memory_method"] = "ru_maxrss of a fresh process running only this job"
    else:
        import importlib

        import torch

        torch.set_num_threads(args.threads)
        with PhasePeak(args.device) as peak:
            try:
                out = dict(getattr(importlib.import_module("bench.jobs"), fn)(**kwargs), status="ok")
            except Exception as err:  # noqa: BLE001
                out = {"status": "error", "error": f"{type(err).__name__}: {err}"}
        out["peak_rss_gib"] = peak.value_gib
        out["peak_memory_method"] = "VmHWM reset at job start, in the bench process (--isolation none)"
        out["wall_s"] = time.perf_counter() - start
    if out.get("status") != "ok":
        print(f"    ! {out.get('status')}: {str(out.get('error', ''))[-600:]}", flush=True)
    print(f"    {out.get('status')} in {out.get('wall_s', 0):.0f} s, peak RSS {out.get('peak_rss_gib') or 0:.2f} GiB, "
          f"load {loadavg()}", flush=True)
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(dict(out, job=fn, kwargs=kwargs), default=str))
    return out


# ------------------------------------------------------------------ sections
def bench_strategies(args, plan, world: str) -> dict:
    wd = str(Path(args.workdir))
    n = plan.num_pairs(world)
    sd15 = world == "sd15"
    wanted = args.strategies.split(",") if args.strategies else list(STRATS)
    isolated = {s: [] for s in STRATS + AIDS}
    # Without process isolation the per-strategy peak cannot be separated; the interleaved job's numbers stand in.
    if args.isolation == "process":
        cache = str(Path(wd) / f"cache-{world}-isolated")
        for s in [s for s in ISOLATED_ORDER if s in wanted]:
            partial = Path(wd) / f"strategy-{world}-{s}-partial.json"
            partial.unlink(missing_ok=True)
            out = run_job(args, "job_strategy", dict(
                world=world, workdir=wd, num_pairs=n, strategy=s, warmup=args.warmup,
                steps=plan.reps(world, "isolated"), cache_dir=cache if s.startswith("ours") else None,
                device=args.device, partial_path=str(partial)))
            if out.get("status") != "ok" and partial.exists():  # killed (memory/time): keep what it measured
                out["partial"] = json.loads(partial.read_text())
            isolated[s].append(out)
        if "official_sgd" in wanted:
            isolated["optimizer_step"].append(run_job(args, "job_optimizer_step", dict(
                world=world, workdir=wd, num_pairs=n, reps=3, device=args.device)))
    inter = {"status": "not run"}
    if not args.no_interleaved:
        inter_strats = ["diffusers", "ours_first_epoch", "ours_cached"] if sd15 else list(STRATS)
        inter = run_job(args, "job_interleaved", dict(world=world, workdir=wd, num_pairs=n, strategies=inter_strats,
                                                      reps=plan.reps(world, "strategies"), warmup=args.warmup,
                                                      device=args.device, share_unet=sd15))
    return summarize_strategies(args, world, inter, isolated)


def summarize_strategies(args, world, inter, isolated) -> dict:
    entries = {}
    for s in STRATS:
        runs = [x for x in isolated[s] if x.get("status") == "ok"]
        iso_times = [t for x in runs for t in x.get("step_times_s", [])]
        inter_s = (inter.get("strategies") or {}).get(s) if inter.get("status") == "ok" else None
        e = {
            "definition": DEFINITIONS[s],
            "median_step_s_interleaved": inter_s["median_step_s"] if inter_s else None,
            "step_times_s_interleaved": inter_s["step_times_s"] if inter_s else [],
            "median_step_s_isolated": median(iso_times),
            "step_times_s_isolated": iso_times,
            "peak_rss_gib": max((x["peak_rss_gib"] for x in runs if x.get("peak_rss_gib")), default=None),
            "peak_rss_source": "isolated process (ru_maxrss)",
            "flops_per_step": next((x.get("flops_per_step") for x in runs if x.get("flops_per_step")),
                                   (inter_s or {}).get("flops_per_step")),
            "status": "ok" if (runs or inter_s) else "; ".join(f"{x.get('status')}: {str(x.get('error', ''))[:300]}"
                                                   for x in isolated[s]) or "not run",
            "loadavg_during": [x.get("loadavg") for x in runs],
        }
        if any(x.get("cuda_max_memory_allocated_gib") for x in runs):
            e["cuda_max_memory_allocated_gib"] = max(x.get("cuda_max_memory_allocated_gib") or 0 for x in runs)
        killed = [x for x in isolated[s] if x.get("status") != "ok"]
        if not runs and killed:
            # A job killed for memory still tells two things: the steps it finished (real step times) and the RSS
            # it had reached (a lower bound of the configuration's peak).
            part_times = [t for x in killed for t in (x.get("partial") or {}).get("step_times_s", [])]
            bounds = [float(m) for x in killed for m in re.findall(r"peak so far ([0-9.]+) GiB", str(x.get("error")))]
            bounds += [(x.get("partial") or {}).get("peak_rss_gib_so_far") or 0 for x in killed]
            e["peak_rss_gib_lower_bound"] = max(bounds) if bounds else None
            if part_times:
                e["median_step_s_isolated"] = median(part_times)
                e["step_times_s_isolated"] = part_times
                e["status"] = f"killed after {len(part_times)} timed step(s): " + e["status"]
            e["flops_per_step"] = e["flops_per_step"] or next(
                ((x.get("partial") or {}).get("flops_per_step") for x in killed if x.get("partial")), None)
        if s == "official" and not runs:
            _estimate_official(e, isolated)
        if e["peak_rss_gib"] is None and inter_s and inter_s.get("step_peak_rss_gib"):
            e["peak_rss_gib"] = inter_s["step_peak_rss_gib"]
            e["peak_rss_source"] = "interleaved process, VmHWM during this strategy's steps (not isolated)"
        e["median_step_s"] = e["median_step_s_interleaved"] or e["median_step_s_isolated"] or e.get(
            "median_step_s_estimated")
        e["timing_source"] = "interleaved" if e["median_step_s_interleaved"] else (
            "isolated" if e["median_step_s_isolated"] else ("estimated" if e["median_step_s"] else "none"))
        entries[s] = e
    ratios, sources = {}, {}

    def time_ratio(a, b):
        ea, eb = entries[a], entries[b]
        if ea["median_step_s_interleaved"] and eb["median_step_s_interleaved"]:
            return ratio(ea["median_step_s_interleaved"], eb["median_step_s_interleaved"]), "interleaved"
        if eb["median_step_s_isolated"] is None and eb.get("median_step_s_estimated"):
            return ratio(ea["median_step_s_isolated"], eb["median_step_s_estimated"]), "isolated; baseline estimated"
        return ratio(ea["median_step_s_isolated"], eb["median_step_s_isolated"]), "isolated"

    for ours_key, prefix in (("ours_cached", "ours"), ("ours_first_epoch", "ours_first_epoch")):
        for base in ("official", "diffusers"):
            key = f"{prefix}_vs_{base}_time_ratio"
            ratios[key], sources[key] = time_ratio(ours_key, base)
            ratios[f"{prefix}_vs_{base}_peak_rss_ratio"] = ratio(entries[ours_key]["peak_rss_gib"],
                                                                 entries[base]["peak_rss_gib"])
    for ours_key, prefix in (("ours_cached", "ours"), ("ours_first_epoch", "ours_first_epoch")):
        for base in ("official", "diffusers"):
            bound = entries[base].get("peak_rss_gib_lower_bound")
            if ratios[f"{prefix}_vs_{base}_peak_rss_ratio"] is None and bound:
                # the baseline was killed at RSS >= bound, so ours / baseline <= ours / bound
                ratios[f"{prefix}_vs_{base}_peak_rss_ratio_upper_bound"] = ratio(entries[ours_key]["peak_rss_gib"],
                                                                                 bound)
            if ratios[f"{prefix}_vs_{base}_peak_rss_ratio"] is None and entries[base].get("peak_rss_gib_estimated"):
                ratios[f"{prefix}_vs_{base}_peak_rss_ratio_estimated"] = ratio(
                    entries[ours_key]["peak_rss_gib"], entries[base]["peak_rss_gib_estimated"])
    cached_over_first, sources["cached_vs_first_epoch_speedup"] = time_ratio("ours_cached", "ours_first_epoch")
    ratios["cached_vs_first_epoch_speedup"] = 1 / cached_over_first if cached_over_first else None
    return {"entries": entries, "ratios": ratios, "ratio_timing_sources": sources,
            "interleaved_job": inter, "isolated_jobs": isolated}


def _estimate_official(e: dict, isolated: dict) -> None:
    """Official step rebuilt where it does not fit: (official step with SGD) - SGD.step + AdamW.step, and peak =
    (official-with-SGD process peak) + the AdamW state bytes (allocated at the first step, held from then on)."""
    sgd = [x for x in isolated.get("official_sgd", []) if x.get("status") == "ok"]
    opt = [x for x in isolated.get("optimizer_step", []) if x.get("status") == "ok"]
    if not (sgd and opt):
        return
    sgd_times = [t for x in sgd for t in x["step_times_s"]]
    delta = median([o["adamw"]["median_step_s"] - o["sgd"]["median_step_s"] for o in opt])
    state = max(o["adamw"]["state_gib"] for o in opt)
    e["median_step_s_estimated"] = median(sgd_times) + delta
    e["step_times_s_official_sgd"] = sgd_times
    e["adamw_minus_sgd_step_s"] = delta
    e["peak_rss_gib_official_sgd"] = max(x["peak_rss_gib"] for x in sgd)
    e["peak_rss_gib_estimated"] = e["peak_rss_gib_official_sgd"] + state
    e["adamw_state_gib"] = state
    e["flops_per_step"] = e["flops_per_step"] or next((x.get("flops_per_step") for x in sgd), None)
    e["estimate"] = ("official step with a stateless SGD (measured, fits in memory) + (AdamW.step - SGD.step) "
                     "measured on the same parameters; peak = that process's ru_maxrss + the AdamW state")


def bench_flow(args, plan, world: str) -> dict:
    """flow_grpo's Flow-DPO step against ours on a flow world: each strategy alone in a fresh process (peak
    memory, isolated times), then all interleaved in one process (the time ratios)."""
    wd = str(Path(args.workdir))
    n = plan.num_pairs(world)
    wanted = args.strategies.split(",") if args.strategies else list(FLOW_STRATS)
    isolated = {s: [] for s in FLOW_STRATS}
    if args.isolation == "process":
        cache = str(Path(wd) / f"cache-{world}-flow-isolated")
        for s in [s for s in FLOW_STRATS if s in wanted and (s in FLOW_ISOLATED or args.strategies)]:
            partial = Path(wd) / f"flow-{world}-{s}-partial.json"
            partial.unlink(missing_ok=True)
            out = run_job(args, "job_flow_strategy", dict(
                world=world, workdir=wd, num_pairs=n, strategy=s, warmup=args.warmup,
                steps=plan.reps(world, "isolated"), cache_dir=cache if s.startswith("ours") else None,
                device=args.device, partial_path=str(partial)))
            if out.get("status") != "ok" and partial.exists():
                out["partial"] = json.loads(partial.read_text())
            isolated[s].append(out)
    inter = {"status": "not run"}
    if not args.no_interleaved:
        inter = run_job(args, "job_flow_interleaved", dict(
            world=world, workdir=wd, num_pairs=n, strategies=[s for s in FLOW_STRATS if s in wanted],
            reps=plan.reps(world, "strategies"), warmup=args.warmup, device=args.device, clocks="wall+cpu"))
    return summarize_flow(world, inter, isolated)


def summarize_flow(world: str, inter: dict, isolated: dict) -> dict:
    entries = {}
    inter_ok = inter.get("status") == "ok"
    gpu = any(x.get("cuda_max_memory_allocated_gib") for runs in isolated.values() for x in runs)
    for s in FLOW_STRATS:
        runs = [x for x in isolated.get(s, []) if x.get("status") == "ok"]
        iso_times = [t for x in runs for t in x.get("step_times_s", [])]
        inter_s = (inter.get("strategies") or {}).get(s) if inter_ok else None
        mem_key = "cuda_max_memory_allocated_gib" if gpu else "peak_rss_gib"
        e = {
            "definition": DEFINITIONS.get(s),
            "median_step_s_interleaved": inter_s["median_step_s"] if inter_s else None,
            "step_times_s_interleaved": inter_s["step_times_s"] if inter_s else [],
            "losses_interleaved": inter_s["losses"] if inter_s else [],
            "median_step_cpu_s_interleaved": (inter_s or {}).get("median_step_cpu_s"),
            "step_cpu_s_interleaved": (inter_s or {}).get("step_cpu_s", []),
            "median_step_s_isolated": median(iso_times), "step_times_s_isolated": iso_times,
            "peak_rss_gib": max((x[mem_key] for x in runs if x.get(mem_key)), default=None),
            "peak_rss_source": ("isolated process, torch.cuda.max_memory_allocated" if gpu else
                                "isolated process (ru_maxrss)") if runs else None,
            "flops_per_step": next((x.get("flops_per_step") for x in runs if x.get("flops_per_step")),
                                   (inter_s or {}).get("flops_per_step")),
            "loadavg_during": [x.get("loadavg") for x in runs],
            "status": "ok" if (runs or inter_s) else "; ".join(
                f"{x.get('status')}: {str(x.get('error', ''))[:300]}" for x in isolated.get(s, []))
            or "not run",
        }
        # the steps' own high-water mark (VmHWM reset after the world build; the build's random init can peak
        # above the steady state, and is the same for every strategy)
        e["steps_peak_rss_gib"] = max((x["steps_peak_rss_gib"] for x in runs if x.get("steps_peak_rss_gib")),
                                      default=None)
        e["build_peak_rss_gib"] = max((x["build_peak_rss_gib"] for x in runs if x.get("build_peak_rss_gib")),
                                      default=None)
        if e["peak_rss_gib"] is None and inter_s and inter_s.get("step_peak_rss_gib"):
            e["peak_rss_gib_interleaved_process"] = inter_s["step_peak_rss_gib"]
        e["median_step_s"] = e["median_step_s_interleaved"] or e["median_step_s_isolated"]
        e["timing_source"] = "interleaved" if e["median_step_s_interleaved"] else (
            "isolated" if e["median_step_s_isolated"] else "none")
        entries[s] = e
    for s in ("ours_first_epoch", "ours_cached"):
        entries[s]["definition"] = DEFINITIONS[s].replace(
            "PreferenceTrainer step",
            "PreferenceTrainer step (sd3, LoRA r=32 a=64, reference = adapters disabled)")
    ratios, sources = {}, {}

    def time_ratio(a, b):
        ea, eb = entries[a], entries[b]
        if ea["median_step_s_interleaved"] and eb["median_step_s_interleaved"]:
            return ratio(ea["median_step_s_interleaved"], eb["median_step_s_interleaved"]), "interleaved"
        return ratio(ea["median_step_s_isolated"], eb["median_step_s_isolated"]), "isolated"

    def paired(a, b, what="step_times_s_interleaved"):
        """Median over repetitions of (a's step / b's step) in the same rotation: robust to load that drifts
        between repetitions."""
        return median([x / y for x, y in zip(entries[a][what], entries[b][what]) if y])

    for ours_key, prefix in (("ours_cached", "ours"), ("ours_first_epoch", "ours_first_epoch")):
        for base in ("flow_grpo", "flow_grpo_body"):
            key = f"{prefix}_vs_{base}_time_ratio"
            ratios[key], sources[key] = time_ratio(ours_key, base)
            ratios[f"{key}_paired_median"] = paired(ours_key, base)
            cpu_key = "median_step_cpu_s_interleaved"
            ratios[f"{prefix}_vs_{base}_cpu_time_ratio"] = ratio(entries[ours_key][cpu_key],
                                                                 entries[base][cpu_key])
        ratios[f"{prefix}_vs_flow_grpo_peak_rss_ratio"] = ratio(entries[ours_key]["peak_rss_gib"],
                                                                entries["flow_grpo"]["peak_rss_gib"])
        ratios[f"{prefix}_vs_flow_grpo_steps_peak_rss_ratio"] = ratio(
            entries[ours_key]["steps_peak_rss_gib"], entries["flow_grpo"]["steps_peak_rss_gib"])
        f_ours, f_base = entries[ours_key]["flops_per_step"], entries["flow_grpo"]["flops_per_step"]
        ratios[f"{prefix}_vs_flow_grpo_flops_ratio"] = ratio(f_ours, f_base)
    over, sources["cached_vs_first_epoch_speedup"] = time_ratio("ours_cached", "ours_first_epoch")
    ratios["cached_vs_first_epoch_speedup"] = 1 / over if over else None
    checks = {k: inter.get(k) for k in ("ours_lora_max_abs_change", "flow_grpo_learner_max_abs_change",
                                        "ours_trainable_params", "flow_grpo_trainable_params", "cache")}
    return {"entries": entries, "ratios": ratios, "ratio_timing_sources": sources, "checks": checks,
            "interleaved_job": inter, "isolated_jobs": isolated}


def add_throughput(args, world_desc: dict, strat: dict, gpu: str | None):
    for e in strat["entries"].values():
        t, f = e.get("median_step_s"), e.get("flops_per_step")
        e["pairs_per_s"] = world_desc["batch_pairs"] / t if t else None
        e["achieved_tflops"] = f / t / 1e12 if (f and t) else None
        peak = args.peak_tflops
        if peak is None and gpu:
            import torch

            precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"
            peak = next((v[precision] for k, v in PEAK_TFLOPS.items() if k in gpu), None)
        e["mfu"] = e["achieved_tflops"] / peak if (peak and e["achieved_tflops"] and gpu) else None


def bench_ablations(args, plan, world: str) -> dict:
    from bench.jobs import ABLATIONS

    names = args.ablations.split(",") if args.ablations else list(ABLATIONS)
    profile = ["ours_cached", "ours_first_epoch"] if "profile" in plan.sections else None
    names = names if "ablations" in plan.sections else []
    partial = Path(args.workdir) / f"ablations-{world}-partial.json"
    partial.unlink(missing_ok=True)
    out = run_job(args, "job_ablations", dict(world=world, workdir=str(args.workdir), num_pairs=plan.num_pairs(world),
                                              names=names, reps=plan.reps(world, "ablations"), warmup=args.warmup,
                                              device=args.device, profile=profile, partial_path=str(partial),
                                              first=args.ablation_first))
    if out.get("status") != "ok" and partial.exists():  # keep the rows measured before the job died
        out = dict(json.loads(partial.read_text()), status=f"partial ({out.get('status')}: "
                   f"{str(out.get('error', ''))[:200]})", peak_rss_gib=out.get("peak_rss_gib"))
    try:
        import xformers  # noqa: F401

        xf = "installed (not measured: CUDA-only kernels)"
    except ImportError:
        xf = "unavailable: xformers is not installable here (no wheel for this torch/CPU); not measured"
    out.setdefault("ablations", []).append({"ablation": "attention_xformers", "status": xf})
    return out


def bench_compile(args, plan, world: str) -> dict:
    timeout = plan.compile_timeout(world)
    out = run_job(args, "job_compile", dict(world=world, workdir=str(args.workdir), num_pairs=plan.num_pairs(world),
                                            reps=plan.reps(world, "compile"), device=args.device,
                                            check_adapters=world == "toy"), timeout=timeout)
    out["time_limit_s"] = timeout
    return out


def bench_epochs(args, plan) -> dict:
    out = {}
    for flip in (False, True):
        out[f"random_flip_{str(flip).lower()}"] = run_job(args, "job_epochs", dict(
            world="toy", workdir=str(args.workdir), num_pairs=64, epochs=3, random_flip=flip, device=args.device))
    return out


def bench_evaluators(args, plan) -> dict:
    from diffalign.evaluators import WEIGHT_FREE, available

    sizes = [1, 8] if plan.quick else [1, 4, 16]
    names = [n for n in available() if n not in WEIGHT_FREE]  # reward models with weights (not the toy oracle)
    return run_job(args, "job_evaluators", dict(workdir=str(args.workdir), names=names, batch_sizes=sizes,
                                                num_images=16, reps=2 if plan.quick else 3, device=args.device))


# ------------------------------------------------------------------ targets and tables
def targets(results: dict) -> list[dict]:
    rows = []
    sd15 = results["configs"].get("sd15", {}).get("strategies")
    if sd15:
        r = sd15["ratios"]
        rows += [
            {"target": "SD1.5 CPU: ours time <= 0.75x official", "value": r.get("ours_vs_official_time_ratio"),
             "limit": 0.75, "note": sd15["ratio_timing_sources"].get("ours_vs_official_time_ratio")},
            {"target": "SD1.5 CPU: ours peak RSS <= 0.6x official",
             "value": r.get("ours_vs_official_peak_rss_ratio") or r.get("ours_vs_official_peak_rss_ratio_upper_bound"),
             "limit": 0.6, "note": None if r.get("ours_vs_official_peak_rss_ratio") else
             "upper bound: the official job was killed for memory at RSS >= the bound (estimated ratio: "
             f"{_f(r.get('ours_vs_official_peak_rss_ratio_estimated'))})"},
            {"target": "SD1.5 CPU: ours time <= 0.85x diffusers", "value": r.get("ours_vs_diffusers_time_ratio"),
             "limit": 0.85},
        ]
    ep = results.get("epochs", {}).get("random_flip_false")
    if ep and ep.get("status") == "ok":
        rows.append({"target": "toy: epoch 2 (cache) >= 3x faster than epoch 1",
                     "value": ep.get("epoch2_vs_epoch1_speedup"), "limit": 3.0, "higher_is_better": True})
    for row in rows:
        v = row["value"]
        row["met"] = None if v is None else (v >= row["limit"] if row.get("higher_is_better") else v <= row["limit"])
    return rows


def _f(x, nd=3):
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{nd}f}" if abs(x) < 1000 else f"{x:.3g}"
    return str(x)


def flow_markdown(results: dict) -> list[str]:
    lines = []
    for world, cfg in results["configs"].items():
        fl = cfg.get("flow")
        if not fl:
            continue
        d = cfg.get("world", {})
        lines += [f"### {world}: {d.get('source', '')}, {d.get('resolution')} px, "
                  f"{d.get('batch_pairs')} pair(s)/step, transformer {d.get('transformer_layers')} blocks",
                  "",
                  "| strategy | median s/step | timing | CPU s/step | alone s/step | peak memory GiB | "
                  "TFLOP/step | vs flow_grpo time (paired) | vs flow_grpo CPU time | vs flow_grpo_body time "
                  "(paired) | vs flow_grpo memory |", "|" + "---|" * 11]
        r = fl["ratios"]
        for name, e in fl["entries"].items():
            pre = {"ours_cached": "ours", "ours_first_epoch": "ours_first_epoch"}.get(name)
            flops = e["flops_per_step"] / 1e12 if e["flops_per_step"] else None
            lines.append("| " + " | ".join([
                name, _f(e["median_step_s"]), e["timing_source"], _f(e.get("median_step_cpu_s_interleaved")),
                _f(e["median_step_s_isolated"]), _f(e["peak_rss_gib"], 2), _f(flops, 4),
                f"{_f(r.get(f'{pre}_vs_flow_grpo_time_ratio'))} "
                f"({_f(r.get(f'{pre}_vs_flow_grpo_time_ratio_paired_median'))})" if pre else "",
                _f(r.get(f"{pre}_vs_flow_grpo_cpu_time_ratio")) if pre else "",
                f"{_f(r.get(f'{pre}_vs_flow_grpo_body_time_ratio'))} "
                f"({_f(r.get(f'{pre}_vs_flow_grpo_body_time_ratio_paired_median'))})" if pre else "",
                _f(r.get(f"{pre}_vs_flow_grpo_peak_rss_ratio")) if pre else ""]) + " |")
        lines.append("")
        c = fl.get("checks") or {}
        lines += [f"LoRA moved (max |Δ|): ours {_f(c.get('ours_lora_max_abs_change'), 6)}, flow_grpo learner "
                  f"{_f(c.get('flow_grpo_learner_max_abs_change'), 6)}; trainable params ours "
                  f"{c.get('ours_trainable_params')}, flow_grpo {c.get('flow_grpo_trainable_params')}; "
                  f"ours cache {c.get('cache')}", ""]
        for name, e in fl["entries"].items():
            if e["status"] != "ok":
                lines += [f"{name}: {e['status'][:400]}", ""]
    return lines


def markdown(results: dict) -> str:
    lines = flow_markdown(results)
    for world, cfg in results["configs"].items():
        st = cfg.get("strategies")
        if not st:
            continue
        d = cfg.get("world", {})
        lines += [f"### {world}: {d.get('source', '')}, {d.get('resolution')} px, {d.get('batch_pairs')} pair(s)/step",
                  "", "| strategy | median s/step | timing | pairs/s | peak RSS GiB | TFLOP/step | achieved TFLOP/s |"
                  " vs official time | vs diffusers time | vs official RSS |", "|" + "---|" * 10]
        r = st["ratios"]
        for name, e in st["entries"].items():
            pre = {"ours_cached": "ours", "ours_first_epoch": "ours_first_epoch"}.get(name)
            rss = _f(e["peak_rss_gib"], 2) if e["peak_rss_gib"] else (
                f">= {e['peak_rss_gib_lower_bound']:.2f} (killed)" if e.get("peak_rss_gib_lower_bound") else "–")
            rss_ratio = ""
            if pre:
                rss_ratio = _f(r.get(f"{pre}_vs_official_peak_rss_ratio"))
                if r.get(f"{pre}_vs_official_peak_rss_ratio_upper_bound"):
                    rss_ratio = f"<= {r[f'{pre}_vs_official_peak_rss_ratio_upper_bound']:.3f}"
            flops = e["flops_per_step"] / 1e12 if e["flops_per_step"] else None
            lines.append("| " + " | ".join([
                name, _f(e["median_step_s"]), e["timing_source"], _f(e.get("pairs_per_s")), rss, _f(flops, 4),
                _f(e.get("achieved_tflops"), 4), _f(r.get(f"{pre}_vs_official_time_ratio")) if pre else "",
                _f(r.get(f"{pre}_vs_diffusers_time_ratio")) if pre else "", rss_ratio]) + " |")
        lines.append("")
        for name, e in st["entries"].items():
            if e["status"] != "ok":
                lines += [f"{name}: {e['status'][:400]}", ""]
            if e.get("estimate"):
                lines += [f"{name} estimated: step {e['median_step_s_estimated']:.1f} s = official-with-SGD step "
                          f"{median(e['step_times_s_official_sgd']):.1f} s + (AdamW.step - SGD.step) "
                          f"{e['adamw_minus_sgd_step_s']:.2f} s; peak RSS {e['peak_rss_gib_estimated']:.2f} GiB = "
                          f"{e['peak_rss_gib_official_sgd']:.2f} GiB (official-with-SGD process) + "
                          f"{e['adamw_state_gib']:.2f} GiB AdamW state", ""]
    for world, cfg in results["configs"].items():
        ab = cfg.get("ablations")
        if not ab or not ab.get("ablations"):
            if ab:
                lines += [f"ablations {world}: {ab.get('status')} {ab.get('error', '')[:300]}", ""]
            continue
        lines += [f"### optimisations on/off, {world} (ours step)", "",
                  "| optimisation | on | off | diffalign default | on s/step | off s/step | on/off time | "
                  "on peak RSS GiB | off peak RSS GiB | status |", "|" + "---|" * 10]
        for a in ab["ablations"]:
            lines.append("| " + " | ".join([a["ablation"], a.get("on", ""), a.get("off", ""), a.get("default", ""),
                                            _f(a.get("on_median_step_s")), _f(a.get("off_median_step_s")),
                                            _f(a.get("on_vs_off_time_ratio")), _f(a.get("on_peak_rss_gib"), 2),
                                            _f(a.get("off_peak_rss_gib"), 2), a.get("status", "")]) + " |")
        comp = cfg.get("compile")
        if comp:
            if comp.get("status") == "ok":
                lines.append(f"| torch.compile (U-Net) | compiled | eager | off | {_f(comp.get('compiled_median_step_s'))}"
                             f" | {_f(comp.get('eager_median_step_s'))} | {_f(comp.get('compiled_vs_eager_time_ratio'))}"
                             f" | – | – | first compiled step {_f(comp.get('first_compiled_step_s'), 1)} s |")
            else:
                lines.append(f"| torch.compile (U-Net) | compiled | eager | off | – | – | – | – | – | "
                             f"{comp.get('status')} (limit {_f(comp.get('time_limit_s'), 0)} s) |")
        lines.append("")
        for what, prof in (ab.get("profile") or {}).items():
            lines += [f"#### torch.profiler, {world}, {what} step (wall {prof['wall_s']:.2f} s, self CPU total "
                      f"{prof['self_cpu_total_s']:.2f} s)", "", "| op | self CPU s | % | calls |", "|---|---|---|---|"]
            lines += [f"| `{o['op']}` | {o['self_cpu_s']:.3f} | {o['self_cpu_pct']:.1f} | {o['calls']} |"
                      for o in prof["top_ops"]]
            lines.append("")
    for key, ep in (results.get("epochs") or {}).items():
        if ep.get("status") != "ok":
            lines += [f"epochs {key}: {ep.get('status')} {ep.get('error', '')[:300]}", ""]
            continue
        lines += [f"### toy world, real `PreferenceTrainer.train()`, {key} ({ep['pairs']} pairs, "
                  f"{ep['batch_pairs']}/step)", "", "| epoch | wall s | median s/step | latent cache hits | misses |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['epoch']} | {r['wall_s']:.2f} | {r['median_step_s']:.3f} | {r['latent_cache_hits']} | "
                  f"{r['latent_cache_misses']} |" for r in ep["epochs"]]
        lines += [f"epoch 1 / epoch 2 wall time: {_f(ep.get('epoch2_vs_epoch1_speedup'), 2)}x", ""]
    ev = results.get("evaluators")
    if ev and ev.get("status") == "ok":
        lines += ["### evaluator throughput (TINY random-weight scorer configs, not the real models)", "",
                  "| scorer | batch size | images | images/s |", "|---|---|---|---|"]
        lines += [f"| {r['scorer']} | {r.get('batch_size', '–')} | {r.get('images', '–')} | "
                  f"{_f(r.get('images_per_s'), 1)} |" if r.get("status") == "ok" else f"| {r['scorer']} | – | – | "
                  f"{r['status']} |" for r in ev["evaluators"]]
        lines.append("")
    if results.get("targets"):
        lines += ["### targets", "", "| target | measured | limit | met | note |", "|---|---|---|---|---|"]
        lines += [f"| {t['target']} | {_f(t['value'])} | {t['limit']} | {t['met']} | {t.get('note') or ''} |"
                  for t in results["targets"]]
        lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------ main
def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.peers or (args.report and peers.is_result(args.report)):
        return peers.main(args, sys.argv[1:] if argv is None else list(argv))
    if args.report:
        print(markdown(json.loads(Path(args.report).read_text())))
        return {}
    if args.merge:
        merged = merge([json.loads(Path(f).read_text()) for f in args.merge], args.merge)
        _write(Path(args.out or ROOT / "bench" / "results" / "full.json"), merged)
        print(markdown(merged))
        return merged
    plan = Plan(args)
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    if args.isolation == "process":
        _log_signals()
    out_path = Path(args.out) if args.out else ROOT / "bench" / "results" / ("quick.json" if args.quick else "full.json")
    started = time.time()
    info = machine_info(args.device)
    results = {
        "meta": {"command": "python bench/run.py " + " ".join(sys.argv[1:] if argv is None else argv),
                 "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": info,
                 "threads": args.threads, "device": args.device, "isolation": args.isolation, "quick": args.quick,
                 "warmup": args.warmup, "loadavg_start": loadavg(), "dtype": "fp32",
                 "gpu_figures": None if info.get("gpu") else "no GPU on this machine: GPU figures not measured "
                                                               "(run with --device cuda where one exists)"},
        "definitions": DEFINITIONS, "configs": {}, "entries": [],
    }
    print(f"diffalign bench: configs {plan.configs}, sections {sorted(plan.sections)}, threads {args.threads}, "
          f"load {loadavg()}", flush=True)
    for world in plan.configs:
        print(f"[{world}]", flush=True)
        cfg = results["configs"].setdefault(world, {})
        from bench.worlds import build_world

        if world in FLOW_WORLDS:
            if plan.sections & {"flow", "strategies"}:
                cfg["flow"] = flow = bench_flow(args, plan, world)
                jobs = [flow["interleaved_job"]] + [j for js in flow["isolated_jobs"].values() for j in js]
                cfg["world"] = next((j["world_description"] for j in jobs if j.get("world_description")),
                                    {"world": world, "batch_pairs": 1})
                add_throughput(args, cfg["world"], flow, info.get("gpu"))
                for s, e in flow["entries"].items():
                    results["entries"].append({
                        "config": world, "strategy": s, "median_step_s": e["median_step_s"],
                        "peak_rss_gib": e["peak_rss_gib"], "pairs_per_s": e.get("pairs_per_s"),
                        "timing_source": e["timing_source"]})
                cfg.update(flow["ratios"])
            skipped = plan.sections - {"flow", "strategies", "epochs", "evaluators"}
            if skipped:
                print(f"  ({world} is a flow world: sections {sorted(skipped)} run on the U-Net worlds only)")
            _write(out_path, results)
            continue
        cfg["world"] = build_world(world, Path(args.workdir), plan.num_pairs(world)).describe() if world == "toy" \
            else _sd15_description()
        if "strategies" in plan.sections:
            cfg["strategies"] = bench_strategies(args, plan, world)
            add_throughput(args, cfg["world"], cfg["strategies"], info.get("gpu"))
            for s, e in cfg["strategies"]["entries"].items():
                results["entries"].append({"config": world, "strategy": s, "median_step_s": e["median_step_s"],
                                           "peak_rss_gib": e["peak_rss_gib"], "pairs_per_s": e.get("pairs_per_s"),
                                           "timing_source": e["timing_source"]})
            for k, v in cfg["strategies"]["ratios"].items():
                results["configs"][world][k] = v  # also at config level: configs.<world>.ours_vs_official_time_ratio
        if "ablations" in plan.sections or "profile" in plan.sections:
            cfg["ablations"] = bench_ablations(args, plan, world)
        if "compile" in plan.sections:
            cfg["compile"] = bench_compile(args, plan, world)
        _write(out_path, results)
    if "epochs" in plan.sections:
        print("[epochs]", flush=True)
        results["epochs"] = bench_epochs(args, plan)
    if "evaluators" in plan.sections:
        print("[evaluators]", flush=True)
        results["evaluators"] = bench_evaluators(args, plan)
    results["targets"] = targets(results)
    results["meta"].update(loadavg_end=loadavg(), wall_s=time.time() - started)
    _write(out_path, results)
    print()
    print(markdown(results))
    print(f"wrote {out_path} in {time.time() - started:.0f} s; load average now {loadavg()}")
    return results


def merge(parts: list[dict], names: list[str]) -> dict:
    """One results dict from several runs (e.g. the SD1.5 sections run one by one): configs and sections are
    taken from the file that has them, later files winning; ``meta.runs`` keeps every run's meta."""
    out = {"meta": {"merged_from": names, "runs": [p["meta"] for p in parts]}, "definitions": DEFINITIONS,
           "configs": {}, "entries": []}
    strategy_parts: dict[str, list] = {}
    ablation_parts: dict[str, list] = {}
    for part in parts:
        for world, cfg in part.get("configs", {}).items():
            out["configs"].setdefault(world, {}).update(
                {k: v for k, v in cfg.items() if k not in ("strategies", "ablations")})
            if "strategies" in cfg:
                strategy_parts.setdefault(world, []).append((part["meta"], cfg["strategies"]))
            if cfg.get("ablations", {}).get("ablations") is not None:
                ablation_parts.setdefault(world, []).append(cfg["ablations"])
    for world, found in ablation_parts.items():
        out["configs"][world]["ablations"] = merge_ablations(found)
        for key in ("epochs", "evaluators"):
            if key in part:
                out[key] = part[key]
    for world, found in strategy_parts.items():  # isolated jobs of every run; the last interleaved job that ran
        isolated = {s: [j for _, st in found for j in st.get("isolated_jobs", {}).get(s, [])] for s in STRATS + AIDS}
        inter = next((st["interleaved_job"] for _, st in reversed(found)
                      if st.get("interleaved_job", {}).get("status") == "ok"), {"status": "not run"})
        merged = summarize_strategies(None, world, inter, isolated)
        gpu = next((m.get("machine", {}).get("gpu") for m, _ in found), None)
        add_throughput(argparse.Namespace(peak_tflops=None), out["configs"][world]["world"], merged, gpu)
        out["configs"][world]["strategies"] = merged
        out["configs"][world].update(merged["ratios"])
    for world, cfg in out["configs"].items():
        for s, e in (cfg.get("strategies") or {}).get("entries", {}).items():
            out["entries"].append({"config": world, "strategy": s, "median_step_s": e["median_step_s"],
                                   "peak_rss_gib": e["peak_rss_gib"], "pairs_per_s": e.get("pairs_per_s"),
                                   "timing_source": e["timing_source"]})
    out["targets"] = targets(out)
    return out


def merge_ablations(found: list[dict]) -> dict:
    """Pool the on/off steps of several ablation runs (e.g. one with 'on' first, one with 'off' first)."""
    merged = dict(found[-1])
    merged["profile"] = next((f["profile"] for f in reversed(found) if f.get("profile")), None)
    merged["runs"] = [{k: f.get(k) for k in ("reps", "first", "status", "wall_s")} for f in found]
    rows = {}
    for f in found:
        for row in f["ablations"]:
            if row["ablation"] not in rows:
                rows[row["ablation"]] = dict(row)
                continue
            acc = rows[row["ablation"]]
            for key in ("on", "off"):
                acc[f"{key}_step_times_s"] = acc.get(f"{key}_step_times_s", []) + row.get(f"{key}_step_times_s", [])
                peaks = [p for p in (acc.get(f"{key}_peak_rss_gib"), row.get(f"{key}_peak_rss_gib")) if p]
                acc[f"{key}_peak_rss_gib"] = max(peaks) if peaks else None
            acc["status"] = acc["status"] if acc["status"] == row["status"] else f"{acc['status']}; {row['status']}"
    for row in rows.values():
        for key in ("on", "off"):
            if f"{key}_step_times_s" in row:
                row[f"{key}_median_step_s"] = median(row[f"{key}_step_times_s"])
        if row.get("on_median_step_s") and row.get("off_median_step_s"):
            row["on_vs_off_time_ratio"] = row["on_median_step_s"] / row["off_median_step_s"]
        if row.get("on_peak_rss_gib") and row.get("off_peak_rss_gib"):
            row["on_vs_off_peak_rss_ratio"] = row["on_peak_rss_gib"] / row["off_peak_rss_gib"]
    merged["ablations"] = list(rows.values())
    merged["status"] = "ok" if all(f.get("status") == "ok" for f in found) else "; ".join(
        str(f.get("status")) for f in found)
    return merged


def _sd15_description() -> dict:
    # Described from the configs, without building 1 B random parameters in the orchestrating process.
    return {"world": "sd15", "source": "sd15-shaped-random (configs in bench/worlds.py)", "resolution": 512,
            "batch_pairs": 1, "unet_params": 859_520_964, "vae_params": 83_653_863, "text_encoder_params": 123_060_480,
            "latent_shape": [4, 64, 64], "text_tokens": 77}


def _log_signals():
    """Say so when an outside signal ends the run (the JSON then holds the configurations finished so far)."""
    import signal

    def handler(signum, frame):
        print(f"bench: received {signal.Signals(signum).name}; stopping (finished jobs are in <workdir>/jobs/, "
              "rerun with --resume)", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            signal.signal(sig, handler)
        except ValueError:  # not the main thread (e.g. called from a test runner thread)
            pass


def _write(path: Path, results: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str))
    tmp.replace(path)


if __name__ == "__main__":
    main()
