"""The peer harness: the real diffusers and official Diffusion-DPO training scripts, unmodified, against
``diffalign train`` on the same pipeline folder, data, resolution, batch, seed and thread count.

    python bench/run.py --peers PATH/train_diffusion_dpo.py,PATH/train.py [--world sd15|toy] [--pairs 6]
        [--peer-steps S] [--threads 2] [--workdir /tmp/diffalign-bench] [--out bench/results/peers-<world>.json]
    python bench/run.py --report bench/results/peers-sd15.json      # print the table again

The scripts are the files the user fetched, identified by content and sha256; nothing of them is copied here. Each
program runs alone in a fresh process through :mod:`bench.peer_launch` (``runpy``, the file byte-identical), one
after the other, with ``OMP_NUM_THREADS=MKL_NUM_THREADS=--threads``. Measured per run:

* step time: the interval between consecutive optimizer-step completions (a global ``Optimizer.step`` post-hook),
  so it holds data loading, VAE and text encoding, forward, backward and the optimizer; the first step (model load,
  lazy init) is left out. Median, min-max, number of intervals; the same on process CPU time;
* peak RSS: ``VmHWM`` of the process (one value per process: both epoch rows of a diffalign run share it).

``diffalign train`` runs twice, 2 x ``--pairs`` steps at 1 pair per step (two epochs): ``random_flip`` false
(like-for-like) and true. Epoch 1 = steps 1..N (cache misses), epoch 2+ = steps N+1..2N (cache hits); the hit
fraction per step is ``data/latent_cache_hits`` of the run's ``metrics.jsonl`` (min over the row's steps).
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from bench.measure import loadavg, median, ratio

ROOT = Path(__file__).resolve().parents[1]
KIND = "diffalign-peers"
# sha256 of the upstream files -> the commit they were fetched at
KNOWN = {
    "3d84934230dab97a4556b8382c1fcb937ffe38be636b76d35ddf731e82988bc0":
        "huggingface/diffusers@58eb52c examples/research_projects/diffusion_dpo/train_diffusion_dpo.py",
    "d8c57878c03debc1134d89d17c6ac8ec1a3b4d72411c2381e611e5f06128a295":
        "SalesforceAIResearch/DiffusionDPO@5233e75 train.py",
}
# what tells the two scripts apart: diffusers' reference is the U-Net with adapters disabled, the official one
# keeps a frozen copy called ref_unet
MARKERS = (("diffusers", "disable_adapters()"), ("official", "ref_unet"))
PEERS = ("diffusers", "official")
RUNS = ("diffusers", "official", "diffalign_noflip", "diffalign_flip")
LABELS = {
    "diffusers": "diffusers train_diffusion_dpo.py (unmodified)",
    "official": "official train.py (unmodified, xformers shim)",
}
ROWS = (  # (label, run, which steps)
    (LABELS["diffusers"], "diffusers", "all"),
    (LABELS["official"], "official", "all"),
    ("diffalign epoch 1 (cache miss)", "diffalign_noflip", "epoch1"),
    ("diffalign epoch 2+ (cache hit), random_flip false", "diffalign_noflip", "epoch2"),
    ("diffalign epoch 1, random_flip true", "diffalign_flip", "epoch1"),
    ("diffalign epoch 2+, random_flip true", "diffalign_flip", "epoch2"),
)
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
WORLDS = {"sd15": 512, "toy": 32}
PRECISIONS = {"no": "fp32", "bf16": "bf16 mixed precision (every program's --mixed_precision bf16)"}
HITS_KEY = "data/latent_cache_hits"


class PeerError(RuntimeError):
    """A one-line user error (missing file, unrecognised script)."""


# ------------------------------------------------------------------ the scripts
def identify(path: str) -> dict:
    """Which peer a script is (by content), its sha256, line count and upstream commit when the hash is known."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise PeerError(f"peer script not found: {path}")
    data = p.read_bytes()
    text = data.decode("utf-8", errors="replace")
    found = [k for k, marker in MARKERS if marker in text]
    try:
        compile(data, str(p), "exec")
        python = True
    except (SyntaxError, ValueError):
        python = False
    if len(found) != 1 or not python:
        raise PeerError(f"{path}: not recognised as diffusers' train_diffusion_dpo.py (Python with "
                        "'disable_adapters()') nor the official DiffusionDPO train.py (Python with 'ref_unet')")
    kind = found[0]
    sha = hashlib.sha256(data).hexdigest()
    return {"kind": kind, "path": str(p.resolve()), "sha256": sha, "lines": text.count("\n"),
            "upstream": KNOWN.get(sha, "unknown version")}


def identify_all(paths: str) -> dict:
    scripts = {}
    for path in [s.strip() for s in paths.split(",") if s.strip()]:
        info = identify(path)
        if info["kind"] in scripts:
            raise PeerError(f"two {info['kind']} scripts given: {scripts[info['kind']]['path']} and {info['path']}")
        scripts[info["kind"]] = info
    return scripts


# ------------------------------------------------------------------ the world on disk
def _pipeline_ready(folder: Path) -> bool:
    return (folder / ".diffalign-peers.json").is_file()


def build_pipeline(world: str, root: Path) -> tuple[Path, str]:
    """The diffusers folder the scripts load with ``--pretrained_model_name_or_path`` (reused when complete)."""
    from bench import worlds

    if world == "toy":
        if worlds._complete(worlds.TOY_SD):
            return worlds.TOY_SD, str(worlds.TOY_SD.relative_to(worlds.REPO_ROOT))
        committed = worlds._committed_toy_sd(root)
        if committed is not None:
            return committed
    folder = root / "pipeline"
    if _pipeline_ready(folder):
        return folder, json.loads((folder / ".diffalign-peers.json").read_text())["source"]
    from diffusers import StableDiffusionPipeline

    from diffalign.models.tokenizer import write_clip_tokenizer_files

    if world == "sd15":
        c = worlds.sd15_components(seed=0)
    else:  # no toy-sd folder anywhere: the tiny random test components
        c = worlds.fixture_module("tiny_models").tiny_components("sd15", seed=0)
    tmp = root / "pipeline.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    StableDiffusionPipeline(vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet,
                            scheduler=c.noise_scheduler, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(tmp)
    # transformers 5 may save only tokenizer.json; the scripts' slow CLIPTokenizer needs vocab.json + merges.txt
    write_clip_tokenizer_files(tmp / "tokenizer")
    cfg = json.loads((tmp / "tokenizer" / "tokenizer_config.json").read_text())
    cfg["model_max_length"] = int(c.tokenizer.model_max_length)
    (tmp / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    source = c.source or world
    _check_tokenizer(tmp, c.tokenizer)
    (tmp / ".diffalign-peers.json").write_text(json.dumps({"source": source, "world": world}))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.replace(folder)
    return folder, source


def _check_tokenizer(folder: Path, reference) -> None:
    """The scripts' ``CLIPTokenizer`` / ``AutoTokenizer(use_fast=False)`` must give the world's token ids."""
    from transformers import AutoTokenizer, CLIPTokenizer

    text = "a red circle on a plain background, photo 3"
    want = reference(text, padding="max_length", max_length=reference.model_max_length, truncation=True).input_ids
    for tok in (CLIPTokenizer.from_pretrained(str(folder), subfolder="tokenizer"),
                AutoTokenizer.from_pretrained(str(folder), subfolder="tokenizer", use_fast=False)):
        got = tok(text, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
        if got != want:
            raise PeerError(f"tokenizer saved in {folder} gives {got[:8]}..., the world's gives {want[:8]}...")


def build_world(world: str, workdir: Path, pairs: int) -> dict:
    from bench.worlds import write_pairs

    if world not in WORLDS:
        raise PeerError(f"--world must be one of {tuple(WORLDS)}, got {world!r}")
    root = Path(workdir) / "peers" / world
    root.mkdir(parents=True, exist_ok=True)
    pipeline, source = build_pipeline(world, root)
    res = WORLDS[world]
    data = write_pairs(root / f"pickapic-{res}px-{pairs}pairs", pairs, res, seed=0, fmt="JPEG")
    return {"world": world, "pipeline": str(pipeline), "pipeline_source": source, "data": str(data),
            "pairs": pairs, "resolution": res, "batch_pairs": 1}


def flips_changed(w: dict, seed: int = 0) -> int:
    """Pairs whose flip drawn in epoch 2 differs from epoch 1's (diffalign's own draw, seeded like the run): with
    ``random_flip`` these epoch-2 steps hit only if the first visit cached the other flip too."""
    from diffalign.data import PairTransform, PreferencePairs

    ds = PreferencePairs(w["data"], transform=PairTransform(w["resolution"], True, True), seed=seed)
    draws = []
    for epoch in (0, 1):
        ds.epoch = epoch
        draws.append([ds.transform.decide_flip(ds.rng(i)) for i in range(len(ds))])
    return sum(a != b for a, b in zip(*draws))


# ------------------------------------------------------------------ the runs
def peer_args(kind: str, w: dict, steps: int, out_dir: Path, precision: str = "no") -> tuple[list[str], list[str]]:
    """``(launcher flags, script arguments)`` of a peer script; ``precision``: its ``--mixed_precision``."""
    common = ["--pretrained_model_name_or_path", w["pipeline"], "--dataset_name", w["data"]]
    tail = ["--resolution", str(w["resolution"]), "--train_batch_size", "1"]
    if kind == "diffusers":  # random flip: the script's default
        return ["--stub-wandb"], common + ["--dataset_split_name", "train"] + tail + [
            "--rank", "8", "--max_train_steps", str(steps), "--seed", "0", "--mixed_precision", precision,
            "--checkpointing_steps", "100000", "--output_dir", str(out_dir)]
    return ["--shim-xformers"], common + tail + [
        "--max_train_steps", str(steps), "--seed", "0", "--mixed_precision", precision,
        "--checkpointing_steps", "100000",
        "--learning_rate", "1e-8", "--lr_warmup_steps", "0", "--no_hflip", "--output_dir", str(out_dir)]


def diffalign_config(w: dict, out_dir: Path, cache_dir: Path, flip: bool, precision: str = "no") -> dict:
    """The ``diffalign train`` config: the diffusers peer's setup (LoRA r=8 on the attention projections) for
    2 x pairs steps of 1 pair, no mid-run checkpoints or validation."""
    return {
        "model": {"pretrained": w["pipeline"], "attention": "sdpa", "gradient_checkpointing": False,
                  "lora": {"rank": 8, "alpha": 8, "target_modules": ["to_k", "to_q", "to_v", "to_out.0"]}},
        "dataset": {"source": w["data"], "resolution": w["resolution"], "random_flip": flip,
                    "cache_dir": str(cache_dir)},
        "objective": {"name": "dpo", "beta": 5000},
        "output_dir": str(out_dir), "max_steps": 2 * w["pairs"], "batch_size": 1,
        "gradient_accumulation_steps": 1, "mixed_precision": precision, "seed": 0, "log_every": 1,
        "checkpoint_every": None, "validation": {"every": None},
    }


def child_env(threads: int, root: Path) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TQDM_DISABLE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               HF_DATASETS_CACHE=str(root / "hf-datasets-cache"),
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    return env


def launch(name: str, launcher: list[str], rest: list[str], run_dir: Path, env: dict,
           timeout: float | None) -> dict:
    """One program through :mod:`bench.peer_launch` in a fresh process; its record plus log tail and status."""
    out, log = run_dir / "launch.json", run_dir / "run.log"
    cmd = [sys.executable, "-m", "bench.peer_launch", "--out", str(out)] + launcher + ["--"] + rest
    print(f"  - {name}: {shlex.join(cmd)}", flush=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        except BaseException:  # the harness is interrupted: its run must not go on alone
            proc.kill()
            proc.wait()
            raise
    rec = json.loads(out.read_text()) if out.is_file() else {}
    rec.update(command=shlex.join(cmd), log=str(log), returncode=code, harness_wall_s=time.perf_counter() - start)
    if not out.is_file():
        rec["status"] = "timeout" if timeout and rec["harness_wall_s"] >= timeout else \
            ("killed" if code in (-9, 137) else "error")
        rec["error"] = f"process ended with code {code} and wrote no record"
    rec["log_tail"] = Path(log).read_text(errors="replace").rstrip().splitlines()[-30:]
    steps = len(rec.get("steps", []))
    print(f"    {rec['status']} (code {code}), {steps} steps, peak RSS {rec.get('peak_rss_gib') or 0:.2f} GiB, "
          f"{rec['harness_wall_s']:.0f} s, load {loadavg()}", flush=True)
    if rec["status"] != "ok":
        print("    " + "\n    ".join(rec["log_tail"][-8:]), flush=True)
    return rec


def read_metrics(out_dir: Path) -> list[dict]:
    path = Path(out_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


# ------------------------------------------------------------------ numbers
def step_range(which: str, num_steps: int, pairs: int) -> tuple[int, int]:
    """1-based inclusive step range of a row: a peer's whole run, or epoch 1 (1..N) / epoch 2+ (N+1..2N)."""
    if which == "all":
        return 1, num_steps
    if which == "epoch1":
        return 1, min(pairs, num_steps)
    return pairs + 1, num_steps


def interval_stats(clocks: list, first: int, last: int) -> dict:
    """Step times of steps ``first..last`` (1-based): step k took ``clocks[k] - clocks[k-1]`` (wall, CPU); step 1
    (model load, lazy init) has no previous step and is never counted."""
    wall, cpu = [], []
    for k in range(max(first, 2), last + 1):
        if k <= len(clocks):
            wall.append(clocks[k - 1][0] - clocks[k - 2][0])
            cpu.append(clocks[k - 1][1] - clocks[k - 2][1])
    return {"n": len(wall), "median_s": median(wall), "min_s": min(wall) if wall else None,
            "max_s": max(wall) if wall else None, "cpu_median_s": median(cpu), "intervals_s": wall,
            "steps": [first, last]}


def cache_hits(metrics: list[dict], first: int, last: int) -> float | None:
    """Min over steps ``first..last`` of the fraction of the step's pairs served from the latent cache;
    ``None`` when the run does not log it."""
    values = [m[HITS_KEY] for m in metrics if HITS_KEY in m and first <= m.get("step", 0) <= last]
    return min(values) if values else None


def rows(runs: dict, pairs: int) -> list[dict]:
    """The table rows with ratios against each peer (time: median s/step; memory: peak RSS)."""
    out = []
    for label, name, which in ROWS:
        run = runs.get(name)
        if run is None:
            continue
        clocks = run.get("steps", [])
        first, last = step_range(which, len(clocks), pairs)
        row = {"label": label, "run": name, "which": which, "status": run.get("status"),
               "steps_done": len(clocks), "steps_requested": run.get("steps_requested"),
               "peak_rss_gib": run.get("peak_rss_gib"), **interval_stats(clocks, first, last)}
        row["cache_hits"] = cache_hits(run.get("metrics", []), first, last) if name.startswith("diffalign") else None
        out.append(row)
    peers = {r["run"]: r for r in out if r["run"] in PEERS and r["status"] == "ok"}
    for r in out:
        for p in PEERS:
            ref = peers.get(p, {})
            r[f"time_vs_{p}"] = ratio(r["median_s"], ref.get("median_s")) if r["status"] == "ok" else None
            r[f"rss_vs_{p}"] = ratio(r["peak_rss_gib"], ref.get("peak_rss_gib")) if r["status"] == "ok" else None
    return out


# ------------------------------------------------------------------ machine
def cpu_info() -> dict:
    model, flags = None, set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model is None:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"model": model, "logical_cpus": os.cpu_count(), "flags": {f: f in flags for f in CPU_FLAGS}}


def versions() -> dict:
    out = {}
    for name in ("torch", "diffusers", "transformers", "peft", "accelerate", "datasets", "xformers", "wandb"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


# ------------------------------------------------------------------ table
def _f(x, nd=3) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def _shims_text(shims: dict) -> str:
    parts = []
    for name, s in (shims or {}).items():
        if isinstance(s, dict):
            s = (f"{s['what']} (is_xformers_available called {s['is_xformers_available_calls']}x, "
                 f"enable_xformers_memory_efficient_attention {s['enable_xformers_calls']}x)")
        parts.append(f"{name}: {s}")
    return "; ".join(parts) or "none"


HEADER = ("| run | steps | median s/step (min-max, n) | CPU s/step | peak RSS GiB | time / diffusers | time / official "
          "| RSS / diffusers | RSS / official | cache hits |")
NOTE = ("s/step: interval between consecutive optimizer-step completions (data, VAE, text encoder, forward, backward, "
        "optimizer), first step excluded; ratios = row / peer (< 1: faster or smaller). Peak RSS is VmHWM of the run's "
        f"process: both rows of a diffalign run share it. Cache hits: min over the row's steps of `{HITS_KEY}` "
        "(n/a: not logged).")


def markdown(res: dict) -> str:
    m, w = res["meta"], res["world"]
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in m["cpu"]["flags"].items())
    vers = ", ".join(f"{k} {v or 'not installed'}" for k, v in m["versions"].items())
    load = (f"load average before {' '.join(map(str, m['loadavg_before']))}, "
            f"after {' '.join(map(str, m.get('loadavg_after') or []))}")
    world = (f"pipeline `{w['pipeline']}` ({w['pipeline_source']}), data `{w['data']}` ({w['pairs']} pairs, "
             f"{w['resolution']} px), 1 pair per step, {PRECISIONS[m.get('precision', 'no')]}; "
             f"peers {m['peer_steps']} steps; diffalign "
             f"{2 * w['pairs']} steps (2 epochs), LoRA r=8 α=8, β=5000, SDPA, no gradient checkpointing")
    lines = [f"## Peer scripts, unmodified, against diffalign train: world `{w['world']}`", "",
             f"- command: `{m['command']}`",
             f"- date: {m['date_utc']}; CPU: {m['cpu']['model']} ({m['cpu']['logical_cpus']} logical); {flags}",
             f"- threads: {m['threads']} (OMP_NUM_THREADS = MKL_NUM_THREADS); {load}",
             f"- versions: {vers}", f"- world: {world}"]
    for kind, s in res["scripts"].items():
        lines.append(f"- {kind} script: `{s['path']}`, sha256 {s['sha256']}, {s['lines']} lines, {s['upstream']}")
    for name, run in res.get("runs", {}).items():
        lines.append(f"- shims, {name}: {_shims_text(run.get('shims'))}")
    lines += ["", HEADER, "|---" * 10 + "|"]
    for r in res.get("rows", []):
        steps = f"{r['steps_done']}/{r['steps_requested']}"
        if r["status"] != "ok":
            why = res["runs"][r["run"]].get("error") or r["status"]
            lines.append(f"| {r['label']} | {steps} | **{r['status']}**: {str(why)[:120]} | | | | | | | |")
            continue
        if r["steps_done"] != r["steps_requested"]:
            steps += " (!)"
        spread = f"{_f(r['median_s'])} ({_f(r['min_s'])}-{_f(r['max_s'])}, {r['n']})"
        hits = "—" if r["run"] in PEERS else _f(r["cache_hits"], 2)
        ratios = " | ".join(_f(r[k], 2) for k in ("time_vs_diffusers", "time_vs_official", "rss_vs_diffusers",
                                                   "rss_vs_official"))
        lines.append(f"| {r['label']} | {steps} | {spread} | {_f(r['cpu_median_s'])} | {_f(r['peak_rss_gib'], 2)} | "
                     f"{ratios} | {hits} |")
    lines += ["", NOTE]
    if "flips_changed_epoch2" in w:
        lines.append(f"With random_flip true, {w['flips_changed_epoch2']} of the {w['pairs']} pairs draw the other "
                     "flip in epoch 2 than in epoch 1.")
    for name, run in res.get("runs", {}).items():
        if run.get("status") != "ok":
            head = f"{name} failed ({run.get('status')}, code {run.get('returncode')}); log `{run.get('log')}`:"
            lines += ["", head, "```", *run.get("log_tail", [])[-12:], "```"]
    return "\n".join(lines)


# ------------------------------------------------------------------ command line
def add_arguments(parser) -> None:
    g = parser.add_argument_group("peer harness (bench/peers.py)")
    g.add_argument("--peers", default=None, metavar="PATHS",
                   help="comma list of the diffusers train_diffusion_dpo.py and/or the official DiffusionDPO "
                        "train.py: run unmodified against diffalign train (--threads defaults to 2 here)")
    g.add_argument("--world", default="sd15", choices=tuple(WORLDS), help="peers: the pipeline (default sd15)")
    g.add_argument("--pairs", type=int, default=6, help="peers: pairs in the data; diffalign trains 2 x pairs steps "
                                                      "(6: with seed 0, 2 pairs change flip in epoch 2)")
    g.add_argument("--peer-steps", type=int, default=None, help="peers: max_train_steps of each script "
                                                                "(default: pairs)")
    g.add_argument("--peer-timeout", type=float, default=None, help="peers: seconds allowed per run")
    g.add_argument("--no-flip-run", action="store_true", help="peers: skip the diffalign run with random_flip")
    g.add_argument("--precision", default="no", choices=tuple(PRECISIONS),
                   help="peers: mixed precision of every program (the scripts' --mixed_precision, diffalign's "
                        "mixed_precision); default no = fp32")


def is_result(path: str) -> bool:
    try:
        return json.loads(Path(path).read_text()).get("kind") == KIND
    except (OSError, ValueError, AttributeError):
        return False


def _given(argv: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def main(args, argv: list[str]) -> dict:
    """Run the peers and diffalign (``args`` from ``bench/run.py``'s parser), print the table, write the JSON."""
    if args.report:
        res = json.loads(Path(args.report).read_text())
        print(markdown(res))
        return res
    try:
        scripts = identify_all(args.peers)
    except PeerError as err:
        raise SystemExit(f"bench: {err}") from None
    threads = args.threads if _given(argv, "--threads") else 2
    if args.pairs < 2:
        raise SystemExit(f"bench: --pairs must be >= 2 (epoch 1 needs an interval), got {args.pairs}")
    pairs, workdir = args.pairs, Path(args.workdir)
    steps = args.peer_steps or pairs
    out_path = Path(args.out) if args.out else ROOT / "bench" / "results" / f"peers-{args.world}.json"
    res = {"kind": KIND, "meta": {
        "command": "python bench/run.py " + shlex.join(argv), "date_utc": datetime.now(timezone.utc).isoformat(
            timespec="seconds"), "cpu": cpu_info(), "threads": threads, "loadavg_before": loadavg(),
        "versions": versions(), "peer_steps": steps, "diffalign_steps": 2 * pairs, "precision": args.precision},
        "scripts": scripts}
    for s in scripts.values():
        print(f"{s['kind']}: {s['path']} sha256 {s['sha256'][:12]} ({s['upstream']})", flush=True)
    try:
        w = res["world"] = build_world(args.world, workdir, pairs)
        w["flips_changed_epoch2"] = flips_changed(w)
    except PeerError as err:
        raise SystemExit(f"bench: {err}") from None
    root = workdir / "peers" / args.world
    env = child_env(threads, root)
    # SIGTERM ends the harness through SystemExit, so the running program is killed with it
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    res["runs"] = {}
    print(f"peers on {args.world}: threads {threads}, load {loadavg()}", flush=True)
    for name in RUNS:
        if (name in PEERS and name not in scripts) or (name == "diffalign_flip" and args.no_flip_run):
            continue
        run_dir = root / "runs" / name
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        if name in PEERS:
            launcher, rest = peer_args(name, w, steps, run_dir / "output", args.precision)
            rest = [scripts[name]["path"]] + rest
            requested = steps
        else:
            cfg = diffalign_config(w, run_dir / "output", run_dir / "cache", flip=name == "diffalign_flip",
                                   precision=args.precision)
            (run_dir / "config.yaml").write_text(json.dumps(cfg, indent=2))  # JSON is YAML
            launcher, rest = ["--module", "diffalign.cli"], ["train", str(run_dir / "config.yaml")]
            requested = 2 * pairs
        run = launch(name, launcher, rest, run_dir, env, args.peer_timeout)
        run["steps_requested"] = requested
        if name.startswith("diffalign"):
            run["metrics"] = read_metrics(run_dir / "output")
        res["runs"][name] = run
        res["rows"] = rows(res["runs"], pairs)
        _write(out_path, res)
    res["meta"]["loadavg_after"] = loadavg()
    res["rows"] = rows(res["runs"], pairs)
    _write(out_path, res)
    print(markdown(res))
    print(f"\nwritten: {out_path}")
    return res


def _write(path: Path, res: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1, default=str))
    tmp.replace(path)
