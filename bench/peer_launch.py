"""Run a training script (or module) unmodified in this process and record when each optimizer step ended.

    python -m bench.peer_launch --out R.json [--shim-xformers] [--stub-wandb] -- script.py ARGS...
    python -m bench.peer_launch --out R.json --module diffalign.cli -- train cfg.yaml k=v ...

Measured, written to ``--out`` as JSON also when the script raises or exits non-zero:

* ``steps``: ``[perf_counter, process_time]`` right after every ``Optimizer.step`` of any torch optimizer (a global
  post-hook, :func:`torch.optim.optimizer.register_optimizer_step_post_hook`; registered before the script builds
  its optimizer); ``start`` is the same pair at launch;
* ``status`` (``ok`` / ``exit`` / ``error`` / ``killed``), ``exit_code``, the exception and its traceback tail;
* ``peak_rss_gib``: the kernel's ``VmHWM`` of this process; ``wall_s``; ``loadavg`` at start and end; thread counts.

The script file is never changed. What is changed around it is listed in ``shims``:

* ``--stub-wandb``: when ``wandb`` is not importable, an empty module with a real ``ModuleSpec`` goes into
  ``sys.modules`` (diffusers' ``train_diffusion_dpo.py`` imports it at top level; it is used only in validation).
* ``--shim-xformers``: the official ``train.py`` raises ``ValueError("xformers is not available...")`` when
  diffusers' ``is_xformers_available()`` is false, and xformers has no CPU build. A fake ``xformers`` module (with
  ``__version__``) goes into ``sys.modules``, ``diffusers.utils.import_utils.is_xformers_available`` returns True and
  ``ModelMixin.enable_xformers_memory_efficient_attention`` does nothing, so attention stays on diffusers' default
  (SDPA), as in diffalign. Calls to both are counted in ``shims``.

A thread ends the process (exit 137, JSON written, ``status: killed``) when ``MemAvailable`` falls below
``--min-available-gib``, and ``oom_score_adj`` is 1000: a run that does not fit fails alone.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
import threading
import time
import traceback
from pathlib import Path

from bench.measure import GIB, mem_available_gib
from bench.measure import _status_kib as status_kib


class Record:
    """What the run leaves behind; :meth:`write` can be called from the memory guard thread as well."""

    def __init__(self, out: Path, argv: list[str]):
        self.out = out
        self.lock = threading.Lock()
        self.written = False
        self.data = {
            "argv": argv, "pid": os.getpid(), "status": "running", "exit_code": None, "error": None,
            "traceback_tail": None, "start": [time.perf_counter(), time.process_time()], "steps": [],
            "shims": {}, "loadavg_start": [round(x, 2) for x in os.getloadavg()],
            "env_threads": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")},
        }

    def step_hook(self, optimizer, args, kwargs):
        self.data["steps"].append([time.perf_counter(), time.process_time()])

    def write(self):
        with self.lock:
            if self.written:
                return
            d = self.data
            d["wall_s"] = time.perf_counter() - d["start"][0]
            d["cpu_s"] = time.process_time() - d["start"][1]
            hwm = status_kib("VmHWM")
            d["peak_rss_gib"] = None if hwm is None else hwm * 1024 / GIB
            d["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
            d["os_threads_end"] = status_kib("Threads")  # /proc/self/status Threads: not KiB, a count
            torch = sys.modules.get("torch")
            d["torch_threads"] = torch.get_num_threads() if torch is not None else None
            d["num_steps"] = len(d["steps"])
            self.out.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.out.with_suffix(".tmp")
            tmp.write_text(json.dumps(d, indent=1, default=str))
            tmp.replace(self.out)
            self.written = True


def stub_wandb(shims: dict) -> None:
    """An empty ``wandb`` module when the real one is not importable."""
    import importlib.machinery
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        shims["wandb"] = "not needed: wandb is importable"
        return
    module = importlib.util.module_from_spec(importlib.machinery.ModuleSpec("wandb", None))
    sys.modules["wandb"] = module
    shims["wandb"] = "empty stub module (wandb not installed)"


def shim_xformers(shims: dict) -> None:
    """Make diffusers report xformers available and turn enabling it into a no-op (attention stays SDPA)."""
    import importlib.machinery
    import importlib.util

    import diffusers.models.attention_processor  # noqa: F401 - bound its own is_xformers_available (False) first
    from diffusers.models.modeling_utils import ModelMixin
    from diffusers.utils import import_utils

    if import_utils.is_xformers_available():
        shims["xformers"] = "not needed: xformers is available"
        return
    fake = importlib.util.module_from_spec(importlib.machinery.ModuleSpec("xformers", None))
    fake.__version__ = "0.0.0+diffalign.shim"
    sys.modules["xformers"] = fake
    info = shims["xformers"] = {
        "what": "fake xformers module; diffusers.utils.import_utils.is_xformers_available -> True; "
                "ModelMixin.enable_xformers_memory_efficient_attention -> no-op (attention stays SDPA)",
        "is_xformers_available_calls": 0, "enable_xformers_calls": 0,
    }

    def available() -> bool:
        info["is_xformers_available_calls"] += 1
        return True

    def enable(self, *args, **kwargs):
        info["enable_xformers_calls"] += 1

    import_utils.is_xformers_available = available
    ModelMixin.enable_xformers_memory_efficient_attention = enable


def memory_guard(record: Record, min_available_gib: float, interval_s: float = 0.5) -> None:
    def watch():
        while True:
            time.sleep(interval_s)
            avail = mem_available_gib()
            if avail is not None and avail < min_available_gib:
                record.data.update(status="killed", exit_code=137, error=(
                    f"memory guard: MemAvailable {avail:.2f} GiB < {min_available_gib} GiB; peak RSS so far is a "
                    "lower bound of this run's peak"))
                record.write()
                sys.stderr.write(f"peer_launch: {record.data['error']}\n")
                sys.stderr.flush()
                os._exit(137)

    threading.Thread(target=watch, daemon=True).start()


def parse_args(argv):
    if "--" not in argv:
        raise SystemExit("usage: python -m bench.peer_launch --out R.json [options] -- script.py ARGS... "
                         "(or --module NAME -- ARGS...)")
    cut = argv.index("--")
    p = argparse.ArgumentParser(prog="python -m bench.peer_launch")
    p.add_argument("--out", required=True, help="JSON written at the end (also on failure)")
    p.add_argument("--module", default=None, help="run this module as __main__ instead of a script file")
    p.add_argument("--stub-wandb", action="store_true", help="empty wandb module when wandb is not importable")
    p.add_argument("--shim-xformers", action="store_true", help="report xformers available, enabling it a no-op")
    p.add_argument("--min-available-gib", type=float, default=0.5, help="memory guard threshold")
    args = p.parse_args(argv[:cut])
    rest = argv[cut + 1:]
    if args.module is None and not rest:
        p.error("a script path is required after --")
    return args, rest


def main(argv=None) -> int:
    args, rest = parse_args(list(sys.argv[1:] if argv is None else argv))
    record = Record(Path(args.out), rest)
    try:
        with open("/proc/self/oom_score_adj", "w") as f:  # if memory runs out, the kernel kills this run first
            f.write("1000")
    except OSError:
        pass
    memory_guard(record, args.min_available_gib)
    code = 0
    try:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        register_optimizer_step_post_hook(record.step_hook)
        if args.stub_wandb:
            stub_wandb(record.data["shims"])
        if args.shim_xformers:
            shim_xformers(record.data["shims"])
        if args.module:
            sys.argv = [args.module] + rest
            runpy.run_module(args.module, run_name="__main__", alter_sys=True)
        else:
            script = str(Path(rest[0]).resolve())
            sys.argv = [script] + rest[1:]
            sys.path.insert(0, str(Path(script).parent))  # what `python script.py` does
            runpy.run_path(script, run_name="__main__")
        record.data["status"] = "ok"
    except SystemExit as err:
        code = err.code if isinstance(err.code, int) else (0 if err.code is None else 1)
        record.data["status"] = "ok" if code == 0 else "exit"
        if code != 0:
            record.data["error"] = f"SystemExit({err.code!r})"
    except BaseException as err:  # noqa: BLE001 - recorded, then the process exits non-zero
        code = 1
        record.data.update(status="error", error=f"{type(err).__name__}: {err}",
                           traceback_tail=traceback.format_exc().splitlines()[-25:])
        traceback.print_exc()
    finally:
        record.data["exit_code"] = code
        record.write()
    return code


if __name__ == "__main__":
    sys.exit(main())
