"""The latent cache with ``random_flip``: what caching a pair's other flip costs (``dataset.cache_flips``), and
why it is encoded rather than mirrored.

    python bench/flips.py --worlds toy,sd15 --threads 1 --out bench/results/flips.json

Per world, in this process:

* **mirror error**: the VAE posterior of the mirrored pixels, ``(μ', σ') = E(flip(x))`` (what the cache stores
  for the other flip), against the cached posterior mirrored, ``(flip(μ), flip(σ))`` (free, but only right if
  the encoder were flip-equivariant), over the world's first
  ``--pairs`` pairs (winners and losers): ``‖flip(μ) − μ'‖ / ‖μ'‖``, the mean of ``|flip(μ) − μ'| / σ'`` (the gap
  in units of the posterior's own sampling noise: below 1, the draw ``z = μ + σ ξ`` hides it), and
  ``‖flip(σ) − σ'‖ / ‖σ'‖``. Zero would mean the VAE encoder is flip-equivariant; it is not, exactly (its
  convolution kernels are not symmetric);
* **encode time**: one VAE encode of a pair (2 images) at the world's resolution, the median of ``--reps``: what
  ``cache_flips: both`` adds once per pair, on its first visit;
* **epochs** (``--epochs``, toy only unless ``--epochs-worlds``): the real ``PreferenceTrainer.train()`` with
  ``random_flip: true`` for each ``cache_flips``, per epoch wall time and latent-cache hits/misses
  (:func:`bench.jobs.job_epochs`), for ``both`` and ``drawn`` (the drawn flip only).

The toy VAE (``assets/toy-sd``) is trained, so its mirror error says something about a trained encoder; the sd15
VAE has random weights (the real one cannot be downloaded here), so its figure only shows the size of the effect
for an untrained network of that shape.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``bench`` and ``diffalign`` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.measure import loadavg, machine_info, median

ROOT = Path(__file__).resolve().parents[1]


def pair_pixels(world, count: int) -> torch.Tensor:
    """``[winners; losers]`` pixels (2·count, 3, R, R) of the world's first pairs, center crop, no flip."""
    from diffalign.data import PairTransform, PreferencePairs

    pairs = PreferencePairs(str(world.data_dir), transform=PairTransform(world.resolution, True, False))
    items = [pairs[i] for i in range(min(count, len(pairs)))]
    return torch.cat([torch.stack([x["pixels_w"] for x in items]), torch.stack([x["pixels_l"] for x in items])])


def mirror_error(vae, pixels: torch.Tensor) -> dict:
    """How far the posterior mirrored is from the posterior of the mirrored pixels."""
    with torch.no_grad():
        dist, dist_mirrored = vae.encode(pixels).latent_dist, vae.encode(pixels.flip(-1)).latent_dist
    mu_gap = dist.mean.flip(-1) - dist_mirrored.mean
    return {
        "images": len(pixels),
        "mean_rel_l2": float(mu_gap.norm() / dist_mirrored.mean.norm()),
        "mean_gap_in_posterior_std": float((mu_gap.abs() / dist_mirrored.std).mean()),
        "std_rel_l2": float((dist.std.flip(-1) - dist_mirrored.std).norm() / dist_mirrored.std.norm()),
        "posterior_std_mean": float(dist_mirrored.std.mean()),
    }


def encode_seconds(vae, pixels: torch.Tensor, reps: int) -> float:
    """Median wall time of one VAE encode of one pair (2 images)."""
    pair = torch.stack([pixels[0], pixels[len(pixels) // 2]])
    times = []
    with torch.no_grad():
        vae.encode(pair)  # warm-up: oneDNN primitives
        for _ in range(reps):
            start = time.perf_counter()
            vae.encode(pair)
            times.append(time.perf_counter() - start)
    return median(times)


def measure_world(name: str, workdir: Path, pairs: int, reps: int, epochs: int) -> dict:
    from bench.jobs import job_epochs
    from bench.worlds import build_world

    world = build_world(name, workdir, num_pairs=max(pairs, 8))
    vae = world.components.vae.eval()
    pixels = pair_pixels(world, pairs)
    out = {"world": name, "resolution": world.resolution, "vae": "trained (toy)" if name == "toy" else
           "random weights", "mirror_error": mirror_error(vae, pixels),
           "vae_encode_pair_s": encode_seconds(vae, pixels, reps), "loadavg": loadavg()}
    del world, vae
    if epochs:
        out["epochs"] = {mode: job_epochs(name, str(workdir), 64 if name == "toy" else pairs, epochs, True,
                                          cache_flips=mode)
                         for mode in ("both", "drawn")}
    return out


def markdown(results: dict) -> str:
    lines = [("| world | VAE | px | images | ‖flip(μ) − μ'‖ / ‖μ'‖ | mean of abs(flip(μ) − μ') / σ' "
              "| ‖flip(σ) − σ'‖ / ‖σ'‖ | VAE encode of a pair, s |"), "|---|---|---|---|---|---|---|---|"]
    for r in results["worlds"]:
        e = r["mirror_error"]
        lines.append(f"| {r['world']} | {r['vae']} | {r['resolution']} | {e['images']} | {e['mean_rel_l2']:.4f} | "
                     f"{e['mean_gap_in_posterior_std']:.3f} | {e['std_rel_l2']:.4f} | {r['vae_encode_pair_s']:.3f} |")
    epochs = [(r["world"], mode, run) for r in results["worlds"] for mode, run in r.get("epochs", {}).items()]
    if epochs:
        lines += ["", "| world | cache_flips | epoch | wall s | median s/step | latent cache hits | misses |",
                  "|---|---|---|---|---|---|---|"]
        for world, mode, run in epochs:
            for e in run["epochs"]:
                lines.append(f"| {world} | {mode} | {e['epoch']} | {e['wall_s']:.2f} | {e['median_step_s']:.3f} | "
                             f"{e['latent_cache_hits']} | {e['latent_cache_misses']} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worlds", default="toy", help="comma list of toy,sd15")
    p.add_argument("--pairs", type=int, default=4, help="pairs whose images enter the mirror error")
    p.add_argument("--reps", type=int, default=3, help="timed VAE encodes per world")
    p.add_argument("--epochs", type=int, default=3, help="train() epochs per cache_flips mode (0: none)")
    p.add_argument("--epochs-worlds", default="toy", help="worlds that also run the epochs (train() runs)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--workdir", default="/tmp/diffalign-bench")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "flips.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    epoch_worlds = set(args.epochs_worlds.split(","))
    results = {"meta": {"command": "python bench/flips.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "threads": args.threads,
                        "machine": machine_info(), "loadavg_start": loadavg()},
               "worlds": [measure_world(w, Path(args.workdir), args.pairs, args.reps,
                                        args.epochs if w in epoch_worlds else 0)
                          for w in args.worlds.split(",")]}
    results["meta"]["loadavg_end"] = loadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
