"""What each measurement process runs. Every ``job_*`` takes plain arguments and returns a JSON-able dict, so it
runs the same in a fresh process (:func:`bench.measure.run_isolated`) or in the caller's (``--isolation none``).

Index plan: world rows are cut into batches ``b_k = rows [k·B, (k+1)·B)``. A step on a batch the ours strategy has
never seen is a cache miss (first epoch); a step on a batch it has seen is a hit (epoch 2+).
"""

from __future__ import annotations

import copy
import os
import shutil
import time
from pathlib import Path

import torch

from .measure import PhasePeak, loadavg, median, memory_guard, peak_rss_gib, sync, timed, trim_memory
from .strategies import DiffusersStep, OfficialStep, OursStep
from .worlds import build_world, fixture_module

STRATEGY_PHASES = ("official", "diffusers", "ours_first_epoch", "ours_cached")


def batch(k: int, b: int) -> list[int]:
    return list(range(k * b, (k + 1) * b))


def count_flops(fn, *args) -> tuple[float, object]:
    """FLOPs of one call (``torch.utils.flop_counter``: matmul/conv/attention, forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        out = fn(*args)
    return float(counter.get_total_flops()), out


def _ours(world, workdir: Path, tag: str, cache_dir: Path | None, device, fresh_cache: bool, components=None):
    if cache_dir is not None and fresh_cache:
        shutil.rmtree(cache_dir, ignore_errors=True)
    out = workdir / f"out-{world.name}-{tag}-{os.getpid()}"
    return OursStep(world, components if components is not None else world.components, out, cache_dir, device)


def _make(world, workdir, name, device, cache_dir, fresh_cache=True):
    if name in ("official", "official_sgd"):
        return OfficialStep(world, world.components, device, optimizer="sgd" if name == "official_sgd" else "adamw")
    if name == "diffusers":
        return DiffusersStep(world, world.components, device)
    return _ours(world, workdir, name, cache_dir, device, fresh_cache)


# ------------------------------------------------------------------ one strategy in its own process
def job_strategy(world: str, workdir: str, num_pairs: int, strategy: str, warmup: int, steps: int,
                 cache_dir: str | None = None, device: str = "cpu", flops: bool = True,
                 partial_path: str | None = None) -> dict:
    """Warm-up + ``steps`` timed steps of one strategy; the process's peak RSS is this configuration's.

    ``ours_first_epoch`` starts from an empty ``cache_dir`` (every step a miss). ``ours_cached`` expects the
    ``cache_dir`` an ``ours_first_epoch`` job of the same round filled, and steps over the same batches (hits).
    ``partial_path``: the result so far is written there after every step (read back if the job is killed).
    """
    workdir = Path(workdir)
    with memory_guard():
        t0 = time.perf_counter()
        w = build_world(world, workdir, num_pairs)
        cache = Path(cache_dir) if cache_dir else None
        s = _make(w, workdir, strategy, device, cache, fresh_cache=strategy == "ours_first_epoch")
        build_s = time.perf_counter() - t0
        b = w.batch_pairs
        times, load, flop_count = [], [loadavg()], None
        for k in range(warmup + steps):
            if k == 0 and flops:
                sync(device)
                start = time.perf_counter()
                flop_count, _ = count_flops(s.step, batch(k, b))
                sync(device)
                dt = time.perf_counter() - start
            else:
                dt, _ = timed(s.step, batch(k, b), device=device)
            if k >= warmup:
                times.append(dt)
            load.append(loadavg())
            _save_partial(partial_path, {"strategy": strategy, "world": world, "step_times_s": times,
                                         "median_step_s": median(times), "flops_per_step": flop_count,
                                         "steps_done": k + 1, "warmup_step_s": dt if k == 0 else None,
                                         "peak_rss_gib_so_far": peak_rss_gib(), "loadavg": load})
        result = {"strategy": strategy, "world": world, "step_times_s": times, "median_step_s": median(times),
                  "flops_per_step": flop_count, "build_s": build_s, "loadavg": load,
                  "timing": "isolated process, one strategy"}
        if isinstance(s, OursStep) and s.trainer.cache is not None:
            result["cache"] = {"hits": s.trainer.cache.hits, "misses": s.trainer.cache.misses}
        if str(device).startswith("cuda"):
            result["cuda_max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return result


def job_optimizer_step(world: str, workdir: str, num_pairs: int, reps: int = 3, device: str = "cpu") -> dict:
    """``AdamW.step`` and ``SGD.step`` (the official recipe's settings) over every U-Net parameter with random
    gradients: what the official step spends in its optimizer, measured where the rest of the step does not fit."""
    workdir = Path(workdir)
    with memory_guard():
        w = build_world(world, workdir, num_pairs)
        unet = w.components.unet.to(device).requires_grad_(True)
        del w
        trim_memory()
        params = list(unet.parameters())
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        out = {"world": world, "params": sum(p.numel() for p in params)}
        for name, opt in (("sgd", torch.optim.SGD(params, lr=1e-8)),
                          ("adamw", torch.optim.AdamW(params, lr=1e-8, betas=(0.9, 0.999), weight_decay=1e-2,
                                                      eps=1e-8))):
            first, _ = timed(opt.step, device=device)  # AdamW allocates its 2 state tensors per parameter here
            times = [timed(opt.step, device=device)[0] for _ in range(reps)]
            zero, _ = timed(lambda o=opt: o.zero_grad(set_to_none=False), device=device)
            out[name] = {"first_step_s": first, "step_times_s": times, "median_step_s": median(times),
                         "state_gib": sum(t.numel() * t.element_size() for st in opt.state.values()
                                          for t in st.values() if torch.is_tensor(t)) / 2**30}
            for p in params:  # zero_grad above reset them; keep gradients non-zero for the next optimizer
                p.grad.normal_(0, 1e-3)
            del zero
        out["loadavg"] = loadavg()
        return out


# ------------------------------------------------------------------ strategies interleaved in one process
def job_interleaved(world: str, workdir: str, num_pairs: int, strategies: list[str], reps: int, warmup: int = 1,
                    device: str = "cpu", share_unet: bool = False, count: bool = True) -> dict:
    """All ``strategies`` in one process, one step of each per repetition, order rotated every repetition.

    ``share_unet``: the diffusers strategy trains the ours strategy's LoRA U-Net (same weights, VAE and text
    encoder: both strategies fit in memory at SD1.5 size; the official one, with its two full U-Nets and AdamW
    state, does not fit next to them on a 23 GiB machine). ``step_peak_rss_gib``: the highest RSS during that
    strategy's timed steps (high-water mark reset before each step; absolute, so it includes every strategy's
    weights held by the process: not a per-strategy footprint).
    """
    workdir = Path(workdir)
    with memory_guard():
        w = build_world(world, workdir, num_pairs)
        b = w.batch_pairs
        ours = None
        if any(s.startswith("ours") for s in strategies):
            cache = workdir / f"cache-{world}-interleaved-{os.getpid()}"
            comps = w.components if share_unet else w.fresh_components()
            ours = _ours(w, workdir, "interleaved", cache, device, True, comps)
        steps = {}
        for name in strategies:
            if name.startswith("ours"):
                steps[name] = ours
            elif name == "diffusers" and share_unet:
                steps[name] = DiffusersStep(w, w.components, device, unet=ours.unet)
            else:
                comps = w.fresh_components()
                steps[name] = OfficialStep(w, comps, device) if name == "official" else DiffusersStep(w, comps, device)

        # Warm-up on batches 0..warmup-1 (ours: miss then hit on the same batch). Repetition r: every strategy
        # but ours_cached steps on batch warmup+r, which ours has never seen (a miss); ours_cached re-reads batch 0.
        if warmup < 1:
            raise ValueError("job_interleaved needs warmup >= 1 (the cached batch is filled during warm-up)")
        flops = {}
        for k in range(warmup):
            for name in strategies:
                if k == 0 and count:  # FLOPs of the first (untimed) step of each strategy
                    flops[name], _ = count_flops(steps[name].step, batch(k, b))
                else:
                    steps[name].step(batch(k, b))
        times = {name: [] for name in strategies}
        peaks = {name: [] for name in strategies}
        load = [loadavg()]
        for r in range(reps):
            rot = r % len(strategies)
            for name in strategies[rot:] + strategies[:rot]:
                idx = batch(0, b) if name == "ours_cached" else batch(warmup + r, b)
                if name == "ours_first_epoch" and set(idx) & ours.seen:
                    raise RuntimeError(f"batch {idx} is already cached; the index plan is broken")
                with PhasePeak(device) as peak:
                    dt, _ = timed(steps[name].step, idx, device=device)
                times[name].append(dt)
                peaks[name].append(peak.value_gib)
            load.append(loadavg())
        out = {"world": world, "reps": reps, "warmup": warmup, "share_unet": share_unet,
               "timing": "interleaved in one process, order rotated per repetition", "loadavg": load,
               "strategies": {n: {"step_times_s": t, "median_step_s": median(t), "flops_per_step": flops.get(n),
                                  "step_peak_rss_gib": max((p for p in peaks[n] if p), default=None)}
                              for n, t in times.items()}}
        if ours is not None and ours.trainer.cache is not None:
            out["cache"] = {"hits": ours.trainer.cache.hits, "misses": ours.trainer.cache.misses}
        return out


# ------------------------------------------------------------------ optimisations on/off
class _SplitPairs:
    """Denoiser wrapper: winners and losers in two calls of B instead of one call of 2B (batching off)."""

    def __init__(self, inner):
        self.inner = inner
        self.unet = getattr(inner, "unet", None)

    def __call__(self, x_t, t, cond):
        from diffalign.models import UNetCondition

        half = x_t.shape[0] // 2
        outs = []
        for sl in (slice(0, half), slice(half, None)):
            added = None if cond.added_cond_kwargs is None else {k: v[sl] for k, v in cond.added_cond_kwargs.items()}
            outs.append(self.inner(x_t[sl], t[sl], UNetCondition(cond.encoder_hidden_states[sl], added, cond.extra)))
        return torch.cat(outs)  # (2B, C, h, w)


class _InferenceMode:
    """Reference wrapper: the reference call under ``torch.inference_mode`` (inside the trainer's no_grad)."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, x_t, t, cond):
        with torch.inference_mode():
            return self.inner(x_t, t, cond)


class _FusedPolicyReference:
    """Policy and reference in one U-Net call on ``[x_t; x_t]`` (4B rows): per-sample LoRA scaling (1 on the
    policy half, 0 on the reference half, by forward hooks on every ``lora_B``) disables the adapters for the
    reference rows. The policy call returns its half and keeps the reference half (detached) for the reference
    call that follows on the same ``x_t``. Autograd still runs the backward over all 4B rows (their gradient is
    zero on the reference half), which is what this lever pays for the one larger call."""

    def __init__(self, unet):
        from diffalign.models import UNetDenoiser

        self.call = UNetDenoiser(unet)
        self.lora_b = [m for name, m in unet.named_modules() if ".lora_B." in name + "."
                       and isinstance(m, torch.nn.Linear)]
        self.mask = None
        self.kept = None

    def _scale(self, module, inputs, output):
        return output * self.mask.view(-1, *([1] * (output.ndim - 1))).to(output.dtype)

    def policy(self, x_t, t, cond):
        rows = x_t.shape[0]
        self.mask = torch.cat([torch.ones(rows), torch.zeros(rows)]).to(x_t.device)
        hooks = [m.register_forward_hook(self._scale) for m in self.lora_b]
        try:
            out = self.call(torch.cat([x_t, x_t]), torch.cat([t, t]), cond.repeat(2))
        finally:
            for h in hooks:
                h.remove()
        self.kept = (x_t, out[rows:].detach())
        return out[:rows]

    def reference(self, x_t, t, cond):
        assert self.kept is not None and self.kept[0] is x_t, "the fused reference follows its policy call"
        out, self.kept = self.kept[1], None
        return out


def _inner_unet(ours):
    from diffalign.models.denoiser import _unwrap

    return _unwrap(ours.trainer.unet)


class Ablation:
    """One optimisation switched on and off around the ours step. ``default`` is what diffalign ships."""

    name = ""
    on_label = "on"
    off_label = "off"
    default = "on"
    needs_miss = False

    def set(self, ours, on: bool):
        raise NotImplementedError

    def restore(self, ours):
        self.set(ours, self.default == "on")


class ReferenceAblation(Ablation):
    name, on_label, off_label = "reference_adapters_disabled", "adapters disabled", "frozen copy"

    def set(self, ours, on):
        from diffalign.models import AdapterDisabledReference, UNetDenoiser

        tr = ours.trainer
        if on:
            tr.reference = AdapterDisabledReference(tr.unet)
            self.copy = None
            trim_memory()
        else:  # FrozenCopyReference semantics: a frozen copy of the *base* U-Net (LoRA layers removed)
            base = copy.deepcopy(_inner_unet(ours))
            base.unload_lora()
            tr.reference = UNetDenoiser(base.requires_grad_(False).eval())
            self.copy_bytes = sum(p.numel() * p.element_size() for p in base.parameters())


class BatchingAblation(Ablation):
    name, on_label, off_label = "pair_batching", "winner+loser in one 2B call", "separate B calls"

    def set(self, ours, on):
        from diffalign.models import AdapterDisabledReference, UNetDenoiser

        tr = ours.trainer
        tr.policy = UNetDenoiser(tr.unet)
        tr.reference = AdapterDisabledReference(tr.unet)
        if not on:
            tr.policy, tr.reference = _SplitPairs(tr.policy), _SplitPairs(tr.reference)


class InferenceModeAblation(Ablation):
    name, on_label, off_label, default = "reference_inference_mode", "inference_mode", "no_grad", "off"

    def set(self, ours, on):
        from diffalign.models import AdapterDisabledReference

        tr = ours.trainer
        tr.reference = AdapterDisabledReference(tr.unet)
        if on:
            tr.reference = _InferenceMode(tr.reference)


class CacheAblation(Ablation):
    name, on_label, off_label = "latent_text_cache", "cache hit (epoch 2+)", "cache miss (epoch 1)"
    needs_miss = True

    def set(self, ours, on):
        pass  # chosen by the batch: seen (hit) or new (miss)


class AttentionAblation(Ablation):
    name, on_label, off_label = "attention_sdpa", "SDPA", "math"

    def set(self, ours, on):
        from diffalign.models import set_attention_backend

        set_attention_backend(_inner_unet(ours), "sdpa" if on else "math")


class CheckpointingAblation(Ablation):
    name, on_label, off_label, default = "gradient_checkpointing", "on", "off", "off"

    def set(self, ours, on):
        unet = _inner_unet(ours)
        unet.enable_gradient_checkpointing() if on else unet.disable_gradient_checkpointing()


class ChannelsLastAblation(Ablation):
    name, on_label, off_label, default = "channels_last", "channels_last", "contiguous (NCHW)", "off"

    def set(self, ours, on):
        _inner_unet(ours).to(memory_format=torch.channels_last if on else torch.contiguous_format)


class Bf16Ablation(Ablation):
    name, on_label, off_label, default = "bf16_autocast", "bf16 autocast", "fp32", "off"

    def set(self, ours, on):
        ours.autocast = torch.bfloat16 if on else None


class FusedReferenceAblation(Ablation):
    name, default = "fused_reference", "off"
    on_label, off_label = "policy + reference in one 4B call (per-sample LoRA scale)", "2B policy + 2B reference calls"

    def set(self, ours, on):
        from diffalign.models import AdapterDisabledReference, UNetDenoiser

        tr = ours.trainer
        tr.policy, tr.reference = UNetDenoiser(tr.unet), AdapterDisabledReference(tr.unet)
        if on:
            fused = _FusedPolicyReference(tr.unet)
            tr.policy, tr.reference = fused.policy, fused.reference


class Bf16ChannelsLastAblation(Ablation):
    name, on_label, off_label, default = ("bf16_channels_last", "bf16 autocast + channels_last (oneDNN)",
                                          "fp32, NCHW", "off")

    def set(self, ours, on):
        ChannelsLastAblation().set(ours, on)
        Bf16Ablation().set(ours, on)


class ThreadsAblation(Ablation):
    """Intra-op threads of the process (``torch.set_num_threads``): 2 against 1; the job's own count after."""

    name, on_label, off_label, default = "two_threads", "2 threads", "1 thread", "job's --threads"

    def set(self, ours, on):
        self.job_threads = getattr(self, "job_threads", torch.get_num_threads())
        torch.set_num_threads(2 if on else 1)

    def restore(self, ours):
        torch.set_num_threads(self.job_threads)


# Cheap and safe first; the frozen copy (+1 U-Net), math attention (+the 4096x4096 attention matrices) and bf16
# (slow without native bf16 kernels) last, so a job killed for memory or time keeps the earlier rows.
ABLATIONS = {a.name: a for a in (BatchingAblation, InferenceModeAblation, CheckpointingAblation, ChannelsLastAblation,
                                 CacheAblation, ReferenceAblation, AttentionAblation, Bf16Ablation,
                                 Bf16ChannelsLastAblation, FusedReferenceAblation, ThreadsAblation)}


def job_ablations(world: str, workdir: str, num_pairs: int, names: list[str], reps: int, warmup: int = 1,
                  device: str = "cpu", profile: list[str] | None = None, profile_rows: int = 15,
                  partial_path: str | None = None, first: str = "on") -> dict:
    """Each optimisation on and off around the ours step (cached unless the ablation is the cache), alternating
    on/off every repetition in one process. Memory: the peak RSS of each variant's steps (high-water mark reset
    before each step; absolute, so it includes the weights every variant holds). The profile runs first.
    ``partial_path``: the result so far is written there after every row (read back if the job dies).
    ``first``: which variant runs first in even repetitions (a second run with the other order balances a
    one-repetition run against a machine whose load drifts)."""
    workdir = Path(workdir)
    with memory_guard():
        w = build_world(world, workdir, num_pairs)
        b = w.batch_pairs
        cache = workdir / f"cache-{world}-ablations-{os.getpid()}"
        ours = _ours(w, workdir, "ablations", cache, device, True)
        fresh = iter(range(1, num_pairs // b))  # batch 0 is the cached batch; 1.. are misses
        ours.step(batch(0, b))  # fill the cache for batch 0 (and warm up)
        for _ in range(warmup):
            ours.step(batch(0, b))
        out = {"world": world, "reps": reps, "first": first, "ablations": [],
               "memory": "peak RSS during the variant's steps (VmHWM reset before each step), absolute"}
        if profile:
            out["profile"] = {}
            for what in profile:
                idx = batch(next(fresh), b) if what == "ours_first_epoch" else batch(0, b)
                out["profile"][what] = profile_step(ours, idx, device, profile_rows)
            _save_partial(partial_path, out)
        results = out["ablations"]
        for name in names:
            abl = ABLATIONS[name]()
            variants = {True: {"step_times_s": [], "peak_gib": []}, False: {"step_times_s": [], "peak_gib": []}}
            status = "ok"
            try:
                for r in range(reps):
                    on_first = (r % 2 == 0) == (first == "on")
                    for on in ((True, False) if on_first else (False, True)):
                        if abl.needs_miss and not on:
                            idx = batch(next(fresh), b)
                        else:
                            idx = batch(0, b)
                        with PhasePeak(device) as peak:
                            abl.set(ours, on)
                            dt, _ = timed(ours.step, idx, device=device)
                            abl.restore(ours)
                        variants[on]["step_times_s"].append(dt)
                        variants[on]["peak_gib"].append(peak.value_gib)
            except StopIteration:
                status = "ran out of fresh batches for cache misses"
            except Exception as err:  # noqa: BLE001 - an optimisation that fails is a result, not a crash
                status = f"error: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                abl.restore(ours)
            row = {"ablation": name, "on": abl.on_label, "off": abl.off_label, "default": abl.default,
                   "status": status, "loadavg": loadavg()}
            for on, key in ((True, "on"), (False, "off")):
                v = variants[on]
                row[f"{key}_step_times_s"] = v["step_times_s"]
                row[f"{key}_median_step_s"] = median(v["step_times_s"])
                peaks = [p for p in v["peak_gib"] if p is not None]
                row[f"{key}_peak_rss_gib"] = max(peaks) if peaks else None
            if row["on_median_step_s"] and row["off_median_step_s"]:
                row["on_vs_off_time_ratio"] = row["on_median_step_s"] / row["off_median_step_s"]
            if row["on_peak_rss_gib"] and row["off_peak_rss_gib"]:
                row["on_vs_off_peak_rss_ratio"] = row["on_peak_rss_gib"] / row["off_peak_rss_gib"]
            if name == ReferenceAblation.name and getattr(abl, "copy_bytes", None):
                row["frozen_copy_gib"] = abl.copy_bytes / 2**30
            results.append(row)
            _save_partial(partial_path, out)
        return out


def _save_partial(path: str | None, out: dict) -> None:
    if path:
        import json

        tmp = Path(path).with_suffix(".tmp")
        tmp.write_text(json.dumps(out, default=str))
        tmp.replace(path)


def profile_step(ours, indices, device="cpu", rows: int = 15) -> dict:
    """``torch.profiler`` over one step: the top ops by self time, and the total."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if str(device).startswith("cuda") else [])
    start = time.perf_counter()
    with profile(activities=acts, record_shapes=False) as prof:
        ours.step(indices)
        sync(device)
    wall = time.perf_counter() - start
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]
    return {
        "wall_s": wall, "self_cpu_total_s": total / 1e6,
        "top_ops": [{"op": e.key, "self_cpu_s": e.self_cpu_time_total / 1e6,
                     "self_cpu_pct": 100 * e.self_cpu_time_total / total, "calls": e.count} for e in top],
    }


# ------------------------------------------------------------------ torch.compile, under a time limit
def job_compile(world: str, workdir: str, num_pairs: int, reps: int, device: str = "cpu",
                check_adapters: bool = True) -> dict:
    """``torch.compile`` of the U-Net (policy and adapters-disabled reference): compile time, then compiled and
    eager cached steps alternating. Also checks that disabling adapters still works under compile (a silent
    failure would make DPO compare the policy with itself)."""
    from diffalign.models import AdapterDisabledReference, UNetDenoiser

    workdir = Path(workdir)
    with memory_guard():
        w = build_world(world, workdir, num_pairs)
        b = w.batch_pairs
        ours = _ours(w, workdir, "compile", workdir / f"cache-{world}-compile-{os.getpid()}", device, True)
        tr = ours.trainer
        for _ in range(2):
            ours.step(batch(0, b))  # cache + warm-up; two steps move LoRA B away from 0
        eager = (tr.policy, tr.reference)
        compiled_unet = torch.compile(tr.unet)
        compiled = (UNetDenoiser(compiled_unet), AdapterDisabledReference(compiled_unet))
        tr.policy, tr.reference = compiled
        compile_s, _ = timed(ours.step, batch(0, b), device=device)  # includes both graphs' compilation
        second_s, _ = timed(ours.step, batch(0, b), device=device)  # adapters toggled: any recompile shows here
        out = {"world": world, "first_compiled_step_s": compile_s, "second_compiled_step_s": second_s}
        if check_adapters:
            out["adapters_disabled_under_compile"] = _check_adapters(tr, compiled, eager, batch(0, b))
        times = {"compiled": [], "eager": []}
        for r in range(reps):
            for which in (("compiled", "eager") if r % 2 == 0 else ("eager", "compiled")):
                tr.policy, tr.reference = compiled if which == "compiled" else eager
                dt, _ = timed(ours.step, batch(0, b), device=device)
                times[which].append(dt)
        tr.policy, tr.reference = eager
        out.update({f"{k}_step_times_s": v for k, v in times.items()})
        out.update({f"{k}_median_step_s": median(v) for k, v in times.items()})
        if out["compiled_median_step_s"] and out["eager_median_step_s"]:
            out["compiled_vs_eager_time_ratio"] = out["compiled_median_step_s"] / out["eager_median_step_s"]
        return out


def _check_adapters(tr, compiled, eager, idx) -> dict:
    from diffalign.data import collate_pairs

    batch_ = collate_pairs([tr.dataset[i] for i in idx])
    with torch.no_grad():
        x0 = tr.encode_latents(batch_)
        cond = tr.condition(batch_)
        t = torch.full((x0.shape[0],), 500, dtype=torch.long, device=x0.device)
        pol_e, ref_e = eager[0](x0, t, cond), eager[1](x0, t, cond)
        pol_c, ref_c = compiled[0](x0, t, cond), compiled[1](x0, t, cond)
    return {
        "policy_vs_reference_max_abs_diff_eager": float((pol_e - ref_e).abs().max()),
        "compiled_reference_vs_eager_reference_max_abs_diff": float((ref_c - ref_e).abs().max()),
        "compiled_policy_vs_eager_policy_max_abs_diff": float((pol_c - pol_e).abs().max()),
    }


# ------------------------------------------------------------------ epoch 1 vs epoch 2 with the real loop
def job_epochs(world: str, workdir: str, num_pairs: int, epochs: int, random_flip: bool, device: str = "cpu",
               cache_flips: str = "both") -> dict:
    """``PreferenceTrainer.train()`` itself (DataLoader, cache, logging) for ``epochs`` epochs; the wall time of
    each epoch and its cache hits/misses. A throw-away 2-step run first warms up kernels and allocators.
    ``cache_flips``: ``dataset.cache_flips`` (how the other flip enters the cache with ``random_flip``)."""
    from diffalign.training.config import parse_config
    from diffalign.training.trainer import PreferenceTrainer

    from .strategies import ours_config

    workdir = Path(workdir)
    with memory_guard():
        w = build_world(world, workdir, num_pairs)
        steps_per_epoch = num_pairs // w.batch_pairs

        class Timed(PreferenceTrainer):
            def after_step(self):
                sync(device)
                self.stamps.append((time.perf_counter(), self.cache.hits, self.cache.misses))

        def run(tag: str, max_steps: int):
            cache = workdir / f"cache-{world}-epochs-{tag}-{os.getpid()}"
            shutil.rmtree(cache, ignore_errors=True)
            cfg = ours_config(w, workdir / f"out-epochs-{tag}-{os.getpid()}", cache)
            cfg["dataset"].update(random_flip=random_flip, cache_flips=cache_flips)
            cfg.update(max_steps=max_steps, log_every=10**6)
            tr = Timed(parse_config(cfg), w.fresh_components()).setup(overwrite=True)
            tr.stamps = []
            start = time.perf_counter()
            tr.train()
            return tr, start

        run("warmup", 2)
        tr, start = run("measured", epochs * steps_per_epoch)
        rows, prev = [], (start, 0, 0)
        for e in range(epochs):
            end = tr.stamps[(e + 1) * steps_per_epoch - 1]
            first = tr.stamps[e * steps_per_epoch - 1][0] if e else start
            step_times = [tr.stamps[i][0] - (tr.stamps[i - 1][0] if i else start)
                          for i in range(e * steps_per_epoch, (e + 1) * steps_per_epoch)]
            rows.append({"epoch": e + 1, "wall_s": end[0] - first, "median_step_s": median(step_times),
                         "latent_cache_hits": end[1] - prev[1], "latent_cache_misses": end[2] - prev[2]})
            prev = end
        out = {"world": world, "random_flip": random_flip, "cache_flips": cache_flips, "pairs": num_pairs,
               "batch_pairs": w.batch_pairs,
               "steps_per_epoch": steps_per_epoch, "epochs": rows, "loadavg": loadavg()}
        if len(rows) > 1:
            out["epoch2_vs_epoch1_speedup"] = rows[0]["wall_s"] / rows[1]["wall_s"]
        return out


# ------------------------------------------------------------------ evaluators (tiny scorers)
def job_evaluators(workdir: str, names: list[str], batch_sizes: list[int], num_images: int, reps: int,
                   device: str = "cpu", image_size: int = 512) -> dict:
    """Images/s of each scorer at each batch size, on the *tiny* random-weight scorers of the test fixtures
    (``tests/fixtures/tiny_scorers.py``: real architectures' code paths and preprocessing, toy widths)."""
    import numpy as np
    from PIL import Image

    from diffalign.evaluators import load

    save_tiny_scorer = fixture_module("tiny_scorers").save_tiny_scorer
    workdir = Path(workdir)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((image_size, image_size))
              for _ in range(num_images)]
    prompts = [f"a photo of object {i}" for i in range(num_images)]
    rows = []
    for name in names:
        directory = workdir / f"tiny-scorer-{name}"
        if not directory.exists():
            save_tiny_scorer(name, directory)
        try:
            scorer = load(name, weights=str(directory), device=device)
            scorer.score(images[:2], prompts[:2], batch_size=2)  # warm-up
        except Exception as err:  # noqa: BLE001
            rows.append({"scorer": name, "status": f"error: {type(err).__name__}: {err}"})
            continue
        for bs in batch_sizes:
            times = []
            for _ in range(reps):
                sync(device)
                start = time.perf_counter()
                scorer.score(images, prompts, batch_size=bs)
                sync(device)
                times.append(time.perf_counter() - start)
            med = median(times)
            rows.append({"scorer": name, "weights": "tiny (random, tests/fixtures/tiny_scorers.py)",
                         "batch_size": bs, "images": num_images, "image_size": image_size, "median_s": med,
                         "images_per_s": num_images / med if med else None, "status": "ok"})
    return {"evaluators": rows, "loadavg": loadavg()}


# ------------------------------------------------------------------ flow transformers: flow_grpo vs ours
def _make_flow(world, workdir: Path, name: str, device, cache_dir: Path | None, fresh_cache: bool = True):
    """A ``step(indices)`` callable of flow strategy ``name`` on ``world`` (its own components)."""
    from .flow_strategies import FlowGrpoStep, OursFlowStep

    if name in ("flow_grpo", "flow_grpo_body"):
        s = FlowGrpoStep(world, world.components, device)
        if name == "flow_grpo_body":
            return s, lambda idx: s.step(idx, precomputed=True)
        return s, s.step
    if cache_dir is not None and fresh_cache:
        shutil.rmtree(cache_dir, ignore_errors=True)
    out = workdir / f"out-{world.name}-{name}-{os.getpid()}"
    s = OursFlowStep(world, world.components, out, cache_dir, device)
    return s, s.step


def job_flow_strategy(world: str, workdir: str, num_pairs: int, strategy: str, warmup: int, steps: int,
                      cache_dir: str | None = None, device: str = "cpu", flops: bool = True,
                      partial_path: str | None = None) -> dict:
    """One flow strategy alone in this process: warm-up + ``steps`` timed steps; the process's peak RSS is
    this configuration's. ``ours_cached`` steps over the batches an ``ours_first_epoch`` job filled
    ``cache_dir`` with; ``flow_grpo_body`` over batch 0 (its inputs computed before the first step)."""
    workdir = Path(workdir)
    with memory_guard():
        t0 = time.perf_counter()
        w = build_world(world, workdir, num_pairs)
        desc = w.describe()
        cache = Path(cache_dir) if cache_dir else None
        s, step = _make_flow(w, workdir, strategy, device, cache, fresh_cache=strategy == "ours_first_epoch")
        del w
        trim_memory()
        b = desc["batch_pairs"]
        if strategy == "flow_grpo_body":
            s.precomputed[tuple(batch(0, b))] = s.inputs(batch(0, b))
        build_s = time.perf_counter() - t0
        build_peak = peak_rss_gib()
        times, losses, load, flop_count = [], [], [loadavg()], None
        phase = PhasePeak(device).__enter__()  # the training steps' own peak, without the world build's
        for k in range(warmup + steps):
            idx = batch(0, b) if strategy == "flow_grpo_body" else batch(k, b)
            if k == 0 and flops:
                sync(device)
                start = time.perf_counter()
                flop_count, loss = count_flops(step, idx)
                sync(device)
                dt = time.perf_counter() - start
            else:
                dt, loss = timed(step, idx, device=device)
            losses.append(loss)
            if k >= warmup:
                times.append(dt)
            load.append(loadavg())
            _save_partial(partial_path, {"strategy": strategy, "world": world, "step_times_s": times,
                                         "median_step_s": median(times), "flops_per_step": flop_count,
                                         "steps_done": k + 1, "peak_rss_gib_so_far": peak_rss_gib(),
                                         "loadavg": load})
        phase.__exit__(None, None, None)
        result = {"strategy": strategy, "world": world, "world_description": desc, "step_times_s": times,
                  "median_step_s": median(times), "losses": losses, "flops_per_step": flop_count,
                  "build_s": build_s, "loadavg": load, "timing": "isolated process, one strategy",
                  "build_peak_rss_gib": build_peak, "steps_peak_rss_gib": phase.value_gib}
        trainer = getattr(s, "trainer", None)
        if trainer is not None and trainer.cache is not None:
            result["cache"] = {"hits": trainer.cache.hits, "misses": trainer.cache.misses}
        if str(device).startswith("cuda"):
            result["cuda_max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return result


def job_flow_interleaved(world: str, workdir: str, num_pairs: int, strategies: list[str], reps: int,
                         warmup: int = 1, device: str = "cpu", count: bool = True,
                         clocks: str = "wall+cpu") -> dict:
    """The flow strategies in one process, one step of each per repetition, order rotated every repetition.

    One set of VAE and text encoders; two transformers: ours (adapter ``default``) and flow_grpo's (adapters
    ``learner`` + ``ref``), the second a copy of the first taken before any adapter (sharing the frozen
    positional-embedding buffer). ``flow_grpo`` and ``flow_grpo_body`` step the same flow_grpo model;
    ``ours_first_epoch`` and ``ours_cached`` the same trainer. Repetition r: ``flow_grpo`` and
    ``ours_first_epoch`` step on batch ``warmup + r`` (never seen: for ours a cache miss), ``flow_grpo_body``
    and ``ours_cached`` on batch 0 (inputs precomputed / cache hit). Also records every loss, and how far each
    trained LoRA moved.

    ``clocks``: each step's wall time (``perf_counter``) and CPU time of this process (``process_time``: with
    one torch thread, the work done, whatever share of the cores other workers leave it; CPU only).
    """
    from .flow_strategies import FlowGrpoStep, OursFlowStep, copy_transformer

    workdir = Path(workdir)
    if warmup < 1:
        raise ValueError("job_flow_interleaved needs warmup >= 1 (the cached batch is filled during warm-up)")
    with memory_guard():
        w = build_world(world, workdir, num_pairs)
        desc = w.describe()
        b = w.batch_pairs
        fg = ours = None
        steps = {}
        if any(s.startswith("flow_grpo") for s in strategies):
            fg_transformer = copy_transformer(w.components.transformer)
        if any(s.startswith("ours") for s in strategies):
            cache = workdir / f"cache-{world}-flow-interleaved-{os.getpid()}"
            shutil.rmtree(cache, ignore_errors=True)
            out_dir = workdir / f"out-{world}-flow-interleaved-{os.getpid()}"
            ours = OursFlowStep(w, w.components, out_dir, cache, device)
            ours_before = ours.lora_state()
            steps.update(ours_first_epoch=ours.step, ours_cached=ours.step)
        if any(s.startswith("flow_grpo") for s in strategies):
            fg = FlowGrpoStep(w, w.components, device, transformer=fg_transformer)
            del fg_transformer
            fg_before = fg.learner_state()
            fg.precomputed[tuple(batch(0, b))] = fg.inputs(batch(0, b))
            steps.update(flow_grpo=fg.step, flow_grpo_body=lambda idx: fg.step(idx, precomputed=True))
        trim_memory()
        losses = {name: [] for name in strategies}
        flops = {}
        for k in range(warmup):
            for name in strategies:
                idx = batch(0, b) if name == "flow_grpo_body" else batch(k, b)
                if k == 0 and count:
                    flops[name], loss = count_flops(steps[name], idx)
                else:
                    loss = steps[name](idx)
                losses[name].append(loss)
        times = {name: [] for name in strategies}
        cpu = {name: [] for name in strategies}
        peaks = {name: [] for name in strategies}
        load = [loadavg()]
        for r in range(reps):
            rot = r % len(strategies)
            for name in strategies[rot:] + strategies[:rot]:
                idx = batch(0, b) if name in ("ours_cached", "flow_grpo_body") else batch(warmup + r, b)
                if name == "ours_first_epoch" and set(idx) & ours.seen:
                    raise RuntimeError(f"batch {idx} is already cached; the index plan is broken")
                with PhasePeak(device) as peak:
                    c0 = time.process_time()
                    dt, loss = timed(steps[name], idx, device=device)
                    cpu[name].append(time.process_time() - c0)
                times[name].append(dt)
                peaks[name].append(peak.value_gib)
                losses[name].append(loss)
            load.append(loadavg())
        moved = lambda after, before: max(float((a - b_).abs().max()) for a, b_ in zip(after, before))
        out = {"world": world, "world_description": desc, "reps": reps, "warmup": warmup,
               "timing": "interleaved in one process, order rotated per repetition", "loadavg": load,
               "strategies": {n: {"step_times_s": t, "median_step_s": median(t), "flops_per_step": flops.get(n),
                                  "step_cpu_s": cpu[n], "median_step_cpu_s": median(cpu[n]),
                                  "losses": losses[n], "step_peak_rss_gib": max((p for p in peaks[n] if p),
                                                                                default=None)}
                              for n, t in times.items()}}
        if ours is not None:
            out["ours_lora_max_abs_change"] = moved(ours.lora_state(), ours_before)
            out["ours_trainable_params"] = sum(p.numel() for p in ours_before)
            if ours.trainer.cache is not None:
                out["cache"] = {"hits": ours.trainer.cache.hits, "misses": ours.trainer.cache.misses}
        if fg is not None:
            out["flow_grpo_learner_max_abs_change"] = moved(fg.learner_state(), fg_before)
            out["flow_grpo_trainable_params"] = sum(p.numel() for p in fg_before)
        if str(device).startswith("cuda"):
            out["cuda_max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return out
