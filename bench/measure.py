"""Clocks, memory meters and the isolated-process runner the bench measures with.

* Time: ``time.perf_counter`` around a whole optimizer step, with ``torch.cuda.synchronize`` on GPU.
* Peak memory, CPU: the peak RSS of a fresh process per configuration, ``resource.getrusage(RUSAGE_SELF).ru_maxrss``
  read at the end of the job (:func:`run_isolated`). Inside a process, :class:`PhasePeak` resets the kernel's
  high-water mark (``/proc/self/clear_refs`` ← 5, after ``malloc_trim``) so one phase's peak can be read without
  the earlier phases (used for the on/off ablations, labelled as such).
* Peak memory, GPU: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.

Fresh processes come from a ``forkserver`` whose server has only imported torch, diffusers, transformers, peft,
accelerate and diffalign (and has run no torch op, so no OpenMP pool exists at fork time): each job is a new
process with its own address space, and its ``ru_maxrss`` is the imports (~0.5 GiB) plus what the job allocates —
what ``python job.py`` would report, without paying 15-20 s of imports per job on this machine.
"""

from __future__ import annotations

import ctypes
import gc
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

GIB = 2**30
PRELOAD = ["bench._preload"]


# ------------------------------------------------------------------ time
def sync(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, *args, device="cpu"):
    """``(seconds, result)`` of one call, synchronised on GPU."""
    sync(device)
    start = time.perf_counter()
    out = fn(*args)
    sync(device)
    return time.perf_counter() - start, out


def median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ratio(a, b) -> float | None:
    return None if a is None or b in (None, 0) else a / b


# ------------------------------------------------------------------ memory
def peak_rss_gib() -> float:
    """Peak resident set size of this process so far (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def trim_memory() -> None:
    """Return freed heap pages to the kernel (glibc keeps them otherwise and RSS stays high)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PhasePeak:
    """Peak memory of one phase inside a process: VmHWM after a reset (CPU) or ``max_memory_allocated`` (GPU).

    ``value_gib`` is ``None`` when the kernel refuses the reset (then only the whole-process peak is known).
    """

    def __init__(self, device="cpu"):
        self.device = str(device)
        self.value_gib: float | None = None

    def __enter__(self):
        import torch

        trim_memory()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            return self
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the RSS high-water mark to the current RSS
            self._ok = True
        except OSError:
            self._ok = False
        return self

    def __exit__(self, *exc):
        import torch

        if self.device.startswith("cuda"):
            self.value_gib = torch.cuda.max_memory_allocated() / GIB
        elif self._ok:
            hwm = _status_kib("VmHWM")
            self.value_gib = None if hwm is None else hwm * 1024 / GIB
        return False


def mem_available_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 / GIB
    except OSError:
        return None
    return None


# ------------------------------------------------------------------ machine
def machine_info(device="cpu") -> dict:
    import torch

    info = {
        "python": platform.python_version(), "platform": platform.platform(), "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(), "mem_total_gib": _mem_total_gib(), "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    for mod in ("diffusers", "transformers", "peft", "accelerate"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    try:
        import xformers

        info["xformers"] = xformers.__version__
    except ImportError:
        info["xformers"] = None  # not installable here: reported as unavailable
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    else:
        info["gpu"] = None
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _mem_total_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            return int(f.readline().split()[1]) * 1024 / GIB
    except (OSError, ValueError, IndexError):
        return None


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ------------------------------------------------------------------ isolated processes
_CTX = None


def _context():
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        root = str(Path(__file__).resolve().parents[1])
        if root not in sys.path:
            sys.path.insert(0, root)
        _CTX.set_forkserver_preload(PRELOAD)
    return _CTX


def _child(conn, fn_path: str, kwargs: dict, threads: int, log_path: str | None):
    if log_path:  # the job's warnings and progress bars go to its log, not to the bench's table
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 2)
        os.dup2(fd, 1)
    try:
        import importlib

        import torch

        try:  # if the machine runs out of memory, the kernel kills this job first, not another worker
            with open("/proc/self/oom_score_adj", "w") as f:
                f.write("1000")
        except OSError:
            pass

        torch.set_num_threads(threads)
        module, name = fn_path.split(":")
        result = getattr(importlib.import_module(module), name)(**kwargs)
        result.setdefault("peak_rss_gib", peak_rss_gib())  # ru_maxrss at the end of the job
        conn.send(("ok", result))
    except BaseException as err:  # noqa: BLE001 - report every failure to the parent, with its traceback
        conn.send(("error", f"{type(err).__name__}: {err}\n{traceback.format_exc()}"))
    finally:
        conn.close()


def run_isolated(fn_path: str, kwargs: dict, *, threads: int = 1, timeout: float | None = None,
                 log_path: str | None = None) -> dict:
    """Run ``module:function(**kwargs)`` in a fresh process; return its dict plus ``peak_rss_gib``.

    On timeout the process is killed and ``{"status": "timeout", "timeout_s": ...}`` comes back; on an exception,
    ``{"status": "error", "error": ...}``.
    """
    ctx = _context()
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, fn_path, kwargs, threads, log_path), daemon=True)
    start = time.perf_counter()
    proc.start()
    child.close()
    result = None
    if parent.poll(timeout):
        try:
            status, payload = parent.recv()
            result = dict(payload, status="ok") if status == "ok" else {"status": "error", "error": payload}
        except EOFError:  # the process ended without answering: killed (memory guard, OOM killer) or crashed
            proc.join(30)
    if result is None:
        if proc.is_alive():
            proc.kill()
            result = {"status": "timeout", "timeout_s": timeout}
        else:
            tail = _tail(log_path)
            result = {"status": "killed" if proc.exitcode in (137, -9) else "error",
                      "error": f"job process ended with exit code {proc.exitcode} without a result; log: {tail}"}
    proc.join(10)
    result["wall_s"] = time.perf_counter() - start
    if log_path:
        result["log"] = log_path
    return result


def _tail(path: str | None, n: int = 3) -> str:
    if not path or not Path(path).exists():
        return ""
    return " | ".join(Path(path).read_text(errors="replace").strip().splitlines()[-n:])


@contextmanager
def memory_guard(min_available_gib: float = 0.5, interval_s: float = 0.5):
    """Kill this process (exit 137) if the machine's available memory falls below ``min_available_gib``.

    Other workers share this machine; a configuration that does not fit must fail alone instead of waking the
    kernel's OOM killer.
    """
    import threading

    stop = threading.Event()
    start = time.perf_counter()

    def watch():
        while not stop.wait(interval_s):
            avail = mem_available_gib()
            if avail is not None and avail < min_available_gib:
                rss, hwm = _status_kib("VmRSS"), _status_kib("VmHWM")
                sys.stderr.write(
                    f"bench: MemAvailable {avail:.2f} GiB < {min_available_gib} GiB, aborting job at RSS "
                    f"{(rss or 0) / 2**20:.2f} GiB (peak so far {(hwm or 0) / 2**20:.2f} GiB: a lower bound of "
                    f"this configuration's peak) after {time.perf_counter() - start:.0f} s\n")
                sys.stderr.flush()
                os._exit(137)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
