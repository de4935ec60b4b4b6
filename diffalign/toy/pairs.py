"""Oracle-labelled preference pairs from the toy pipeline, in the Pick-a-Pic v2 schema.

    python -m diffalign.toy make-pairs --model assets/toy-sd --out assets/toy-pairs --n-pairs 780 --seed 0
    python -m diffalign.toy make-pairs --model assets/toy-flow --out assets/toy-flow-pairs --n-pairs 780 \
        --seed 0

Pair ``k`` uses TRAIN prompt ``k mod 78`` and two seeds, ``seed_0 = 10⁶·seed + 2k`` and ``seed_1 = seed_0 + 1``; the two
images come from the base pipeline (the U-Net toy-sd or the SD3-style toy-flow) with
:func:`diffalign.toy.components.generate` defaults of its world and are scored by
:func:`diffalign.toy.oracle.oracle_reward`. The higher reward wins (``label = 1.0`` vs ``0.0``); when the rewards
differ by at most ``tie_margin`` the pair is a tie, ``0.5 / 0.5``, as in Pick-a-Pic (Diffusion-DPO drops ties).

Columns of ``train-00000-of-00001.parquet``:

================  =========  ===================================================================
column            type       meaning
================  =========  ===================================================================
caption           string     the prompt
jpg_0, jpg_1      binary     PNG bytes (Pick-a-Pic's column names; any PIL-readable bytes work)
label_0, label_1  float64    1.0 / 0.0 for winner / loser, 0.5 / 0.5 for a tie
user_id           int64      0: every label comes from the oracle
ranking_id        int64      pair index k
model_0, model_1  string     the model folder's name (``"toy-sd"``, ``"toy-flow"``)
has_label         bool       True
are_different     bool       the two PNGs differ
seed_0, seed_1    int64      generator seeds of the two images
reward_0, reward_1  float64  oracle rewards the labels come from
================  =========  ===================================================================

Next to it: ``train_prompts.txt`` and ``heldout_prompts.txt`` (one prompt a line, disjoint) and ``pairs_report.json``.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np

from .components import generate
from .oracle import oracle_terms
from .shapes import heldout_prompts, train_prompts

PARQUET_NAME = "train-00000-of-00001.parquet"
REPORT_NAME = "pairs_report.json"
MODEL_NAME = "toy-sd"


def _png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def label_pairs(reward_0: np.ndarray, reward_1: np.ndarray, *, tie_margin: float) -> tuple[np.ndarray, np.ndarray]:
    """Pick-a-Pic labels from two reward arrays (N,): ``(1, 0)`` if image 0 wins, ``(0, 1)`` if image 1 wins,
    ``(0.5, 0.5)`` when ``|reward_0 - reward_1| <= tie_margin``."""
    diff = np.asarray(reward_0, dtype=np.float64) - np.asarray(reward_1, dtype=np.float64)
    label_0 = np.where(diff > tie_margin, 1.0, np.where(diff < -tie_margin, 0.0, 0.5))
    return label_0, 1.0 - label_0


def make_pairs(
    pipe,
    n_pairs: int,
    *,
    seed: int = 0,
    tie_margin: float = 0.01,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    progress: bool = True,
    model_name: str = MODEL_NAME,
) -> tuple[dict[str, list], dict]:
    """Generate, score and label ``n_pairs`` pairs. Returns the columns (see module doc) and summary statistics.
    Steps and guidance None: the defaults of the pipeline's world (:func:`diffalign.toy.generate`)."""
    from tqdm.auto import tqdm

    prompts = train_prompts()
    captions = [prompts[k % len(prompts)] for k in range(n_pairs)]
    seeds_0 = [1_000_000 * seed + 2 * k for k in range(n_pairs)]
    seeds_1 = [s + 1 for s in seeds_0]
    images_0, images_1 = [], []
    chunk = 32  # pairs per pipeline call: 64 images
    for i in tqdm(range(0, n_pairs, chunk), desc="make-pairs", disable=not progress):
        caps, s0, s1 = captions[i : i + chunk], seeds_0[i : i + chunk], seeds_1[i : i + chunk]
        images = generate(
            pipe, caps + caps, s0 + s1, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale
        )
        images_0 += images[: len(caps)]
        images_1 += images[len(caps) :]
    terms_0, terms_1 = oracle_terms(images_0, captions), oracle_terms(images_1, captions)
    label_0, label_1 = label_pairs(terms_0["reward"], terms_1["reward"], tie_margin=tie_margin)

    png_0, png_1 = [_png_bytes(im) for im in images_0], [_png_bytes(im) for im in images_1]
    columns = {
        "caption": captions,
        "jpg_0": png_0,
        "jpg_1": png_1,
        "label_0": label_0.tolist(),
        "label_1": label_1.tolist(),
        "user_id": [0] * n_pairs,
        "ranking_id": list(range(n_pairs)),
        "model_0": [model_name] * n_pairs,
        "model_1": [model_name] * n_pairs,
        "has_label": [True] * n_pairs,
        "are_different": [a != b for a, b in zip(png_0, png_1)],
        "seed_0": seeds_0,
        "seed_1": seeds_1,
        "reward_0": terms_0["reward"].tolist(),
        "reward_1": terms_1["reward"].tolist(),
    }
    stats = pair_statistics(terms_0, terms_1, label_0)
    return columns, stats


def pair_statistics(terms_0: dict[str, np.ndarray], terms_1: dict[str, np.ndarray], label_0: np.ndarray) -> dict:
    """Counts and how the winners differ from the losers (size: the taste attribute)."""
    decided = label_0 != 0.5
    win0 = label_0 == 1.0
    winner = {k: np.where(win0, terms_0[k], terms_1[k])[decided] for k in terms_0}
    loser = {k: np.where(win0, terms_1[k], terms_0[k])[decided] for k in terms_0}
    both_match = (winner["match"] > 0) & (loser["match"] > 0)
    return {
        "n_pairs": int(len(label_0)),
        "n_ties": int((~decided).sum()),
        "winner_larger": float((winner["half_size"] > loser["half_size"]).mean()),
        "winner_larger_when_both_match": float((winner["half_size"][both_match] > loser["half_size"][both_match]).mean()),
        "winner_matches_caption": float(winner["match"].mean()),
        "loser_matches_caption": float(loser["match"].mean()),
        "both_match": float(both_match.mean()),
        "winner_mean_half_size": float(winner["half_size"].mean()),
        "loser_mean_half_size": float(loser["half_size"].mean()),
        "mean_reward": float(np.concatenate([terms_0["reward"], terms_1["reward"]]).mean()),
        "mean_reward_margin": float((winner["reward"] - loser["reward"]).mean()),
        "match_rate": float(np.concatenate([terms_0["match"], terms_1["match"]]).mean()),
    }


def write_pairs(columns: dict[str, list], out_dir: str | Path) -> Path:
    """Write the parquet file and the two prompt lists into ``out_dir``; returns the parquet path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    schema = pa.schema(
        [
            ("caption", pa.string()),
            ("jpg_0", pa.binary()),
            ("jpg_1", pa.binary()),
            ("label_0", pa.float64()),
            ("label_1", pa.float64()),
            ("user_id", pa.int64()),
            ("ranking_id", pa.int64()),
            ("model_0", pa.string()),
            ("model_1", pa.string()),
            ("has_label", pa.bool_()),
            ("are_different", pa.bool_()),
            ("seed_0", pa.int64()),
            ("seed_1", pa.int64()),
            ("reward_0", pa.float64()),
            ("reward_1", pa.float64()),
        ]
    )
    path = out_dir / PARQUET_NAME
    pq.write_table(pa.table(columns, schema=schema), path)
    (out_dir / "train_prompts.txt").write_text("\n".join(train_prompts()) + "\n")
    (out_dir / "heldout_prompts.txt").write_text("\n".join(heldout_prompts()) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    import argparse

    import torch

    from .components import (
        DEFAULT_FLOW_GUIDANCE_SCALE,
        DEFAULT_FLOW_NUM_INFERENCE_STEPS,
        DEFAULT_GUIDANCE_SCALE,
        DEFAULT_NUM_INFERENCE_STEPS,
        is_flow_pipeline,
    )
    from ..inference import load_pipeline

    p = argparse.ArgumentParser(prog="python -m diffalign.toy make-pairs", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="toy pipeline folder (assets/toy-sd or assets/toy-flow)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n-pairs", type=int, default=780)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tie-margin", type=float, default=0.01)
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the world's, 20)")
    p.add_argument("--guidance-scale", type=float, default=None, help="CFG scale (default: the world's, 5)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (0: leave torch's default)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    pipe = load_pipeline(str(args.model), device="cpu")
    flow = is_flow_pipeline(pipe)
    steps = args.steps or (DEFAULT_FLOW_NUM_INFERENCE_STEPS if flow else DEFAULT_NUM_INFERENCE_STEPS)
    guidance = args.guidance_scale if args.guidance_scale is not None else (
        DEFAULT_FLOW_GUIDANCE_SCALE if flow else DEFAULT_GUIDANCE_SCALE)
    columns, stats = make_pairs(
        pipe, args.n_pairs, seed=args.seed, tie_margin=args.tie_margin, num_inference_steps=steps,
        guidance_scale=guidance, progress=not args.no_progress, model_name=Path(args.model).resolve().name,
    )
    path = write_pairs(columns, args.out)
    report = {
        "model": str(args.model),
        "seed": args.seed,
        "tie_margin": args.tie_margin,
        "num_inference_steps": steps,
        "guidance_scale": guidance,
        "stats": stats,
        "parquet_bytes": path.stat().st_size,
        "wall_time_s": round(time.perf_counter() - t0, 1),
        "threads": torch.get_num_threads(),
    }
    (Path(args.out) / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0
