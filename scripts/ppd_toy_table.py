"""PPD in the toy multi-user world, end to end, as one table: user (oracle) x embedding used -> mean reward.

    python scripts/ppd_toy_table.py --out runs/ppd-toy            # ~16 min on 1 CPU thread
    python scripts/ppd_toy_table.py --quick --out /tmp/ppd-quick   # smoke run, ~1-2 min

1. Base model: ``assets/toy-sd-ppd`` (the shapes world with free colours, cross-attention at 8x8 too) when present,
   else ``assets/toy-sd``.
2. Data: ``--pool`` pairs of base samples on the TRAIN prompts; each of the four training users (light, warm, dark,
   cold; :mod:`diffalign.personalization.toy`), or with ``--train-every 30`` twelve, labels every pair with their own
   reward: opposite users give opposite labels to the same pair. A Pick-a-Pic-schema parquet with ``user_id``.
3. Train one PPD model on all users with ``configs/toy_ppd.yaml`` (objective ``ppd``, mean-colour user encoder,
   user branch only), its model/data/output paths and seed overridden (``--reuse-run``: evaluate the model already
   in ``OUT/run``).
4. Evaluate on the HELD-OUT prompts, the same seeds for every column: no user (the base) and one column per user,
   the four named training users and four held-out users (light-warm 45°, dark-warm 135°, dark-cold 225°, light-cold
   315°; never trained on). Every user is served from 4 fresh examples (``--serve stored``: training users from the
   run's stored embedding instead) of their own: each user labels their own fresh base pairs, as each person of
   Pick-a-Pic labels their own images (when all users took their examples from the same pairs in the same order, two
   users 45° apart gave the same 4 labels, hence the same embedding, with probability 0.75⁴ ≈ 0.32). ``--draws``
   disjoint draws of 4 examples, image ``i`` of the column made with draw ``i mod draws``, so the cell averages over
   which 4 examples the user happened to give. Every image is scored by every user's oracle. Then interpolation
   light -> dark in embedding space (and in prediction space).
5. Writes ``table.md`` (the markdown for docs/ppd.md) and ``results.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "toy_ppd.yaml"
FULL = dict(pool=400, eval_seeds=16, examples=4, draws=64)
QUICK = dict(pool=24, eval_seeds=1, examples=4, draws=1)
# --quick: training overrides on top of configs/toy_ppd.yaml
QUICK_OVERRIDES = ["max_steps=4", "batch_size=4", "objective.example_sets=1", "objective.num_tokens=2"]
ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
BASE, NO_USER = "base model", "PPD, no user"


def paired_se(a: np.ndarray, b: np.ndarray, clusters: int = 1) -> float:
    """Standard error of ``mean(a - b)`` over paired images; with ``clusters`` > 1, over the per-cluster means of
    ``a - b`` (image ``i`` in cluster ``i mod clusters``: one cluster per example draw, whose images share a user
    embedding)."""
    d = np.asarray(a) - np.asarray(b)
    clusters = min(clusters, len(d))  # more draws than images: every image is its own draw
    if clusters > 1:
        d = np.array([d[c::clusters].mean() for c in range(clusters)])
    return float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/ppd-toy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", help="base pipeline folder (default: assets/toy-sd-ppd, else assets/toy-sd)")
    p.add_argument("--quick", action="store_true", help="tiny settings: checks the script runs, numbers meaningless")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="training overrides on top of configs/toy_ppd.yaml, e.g. objective.example_sets=16")
    p.add_argument("--serve", choices=("fresh", "stored"), default="fresh",
                   help="fresh: every user, training users too, is served from 4 new examples (the paper's protocol), "
                        "averaged over the draws; stored: training users get the run's stored embedding (the mean of "
                        "their training sets' features, what `--user ID` uses)")
    p.add_argument("--draws", type=int,
                   help=f"example draws of 4 per user (default {FULL['draws']}); image i of a column uses draw "
                        "i mod draws")
    p.add_argument("--tie-margin", type=float, default=0.01,
                   help="users leave pairs with |Δr| <= this out, in their labels and their few-shot examples")
    p.add_argument("--train-every", type=float, default=90.0,
                   help="a training user every this many degrees of the taste circle (default 90: the four of the "
                        "table); e.g. 30 adds eight more users who label the pairs and train, but are not in the table")
    p.add_argument("--user-scale", type=float,
                   help="scale s of the user branch at inference (default: the trained one, 1)")
    p.add_argument("--cond-only", action="store_true",
                   help="user tokens on the conditional half of classifier-free guidance only (IP-Adapter's "
                        "practice): the user's effect is multiplied by the guidance scale")
    p.add_argument("--reuse-run", action="store_true",
                   help="evaluate the model already trained in OUT/run (same seed and data options) instead of "
                        "training again")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; 1 is fastest for these tiny models on a busy machine (2 threads spin on "
                        "contended cores)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from diffalign.inference import generate, load_pipeline
    from diffalign.personalization import build_user_encoder, load_user_branch, save_examples, user_tokens
    from diffalign.personalization.cli import serve_users
    from diffalign.personalization.io import load_user_embeddings
    from diffalign.personalization.toy import (
        GENERATION, HELDOUT_USERS, TRAIN_USERS, label_pairs, sample_pairs, toy_base_model, toy_prompts,
        training_users, user_examples, write_pairs,
    )
    from diffalign.personalization.trainer import PersonalizedTrainer
    from diffalign.toy.components import DEFAULT_BATCH_SIZE
    from diffalign.toy.oracle import caption_match
    from diffalign.training.config import load_config

    o = dict(QUICK if args.quick else FULL)
    if args.draws is not None:
        if args.draws < 1:
            p.error("--draws must be >= 1")
        o["draws"] = args.draws
    out = Path(args.out)
    if args.reuse_run and not (out / "run" / "summary.json").is_file():
        p.error(f"--reuse-run: no finished run in {out / 'run'} (summary.json missing); run without it first")
    out.mkdir(parents=True, exist_ok=True)
    t0, c0 = time.time(), time.process_time()
    timings = {}
    model = args.model or toy_base_model()
    train_prompts, eval_prompts = toy_prompts()
    pipe = load_pipeline(model, device="cpu")

    # 1-2. pairs labelled by every training user; every served user's examples from fresh base pairs of their own
    pool = sample_pairs(pipe, train_prompts, o["pool"], seed=args.seed)
    trained = training_users(args.train_every)
    cols = label_pairs(pool, trained, tie_margin=args.tie_margin)
    pairs_path = write_pairs(cols, out / "pairs")
    served = HELDOUT_USERS if args.serve == "stored" else TRAIN_USERS + HELDOUT_USERS
    per_user = (o["examples"] + 1) * o["draws"]  # one spare pair per draw for ties
    fresh = sample_pairs(pipe, train_prompts, per_user * len(served), seed=args.seed + 1)
    example_files = {u.name: [save_examples(user_examples(fresh.part(i, len(served)), u, o["examples"], draw=d,
                                                          tie_margin=args.tie_margin),
                                            out / "users" / f"{u.name}-{d}.jsonl") for d in range(o["draws"])]
                     for i, u in enumerate(served)}
    timings["data_s"] = time.time() - t0

    # 3. one PPD model for all users
    t1 = time.time()
    run = out / "run"
    overrides = [f"model.pretrained={model}", f"dataset.source={pairs_path.parent}", f"output_dir={run}",
                 f"seed={args.seed}", f"objective.num_examples={o['examples']}", *(QUICK_OVERRIDES if args.quick else []),
                 *args.set]
    cfg = load_config(CONFIG, overrides)
    if args.reuse_run:
        summary = json.loads((run / "summary.json").read_text())
    else:
        trainer = PersonalizedTrainer(cfg).setup(overwrite=True)
        summary = trainer.train()
        trainer.cleanup()
    timings["train_s"] = time.time() - t1

    # 4. evaluation: the same seeds for every embedding
    t2 = time.time()
    from diffalign.models.lora import LORA_WEIGHT_NAME
    from diffalign.personalization import load_examples

    prompts = [pr for pr in eval_prompts for _ in range(o["eval_seeds"])]
    seeds = [10_000_000 + 1000 * args.seed + k for k in range(len(prompts))]
    users = list(TRAIN_USERS) + list(HELDOUT_USERS)

    def score(mixtures=(None,), space="embedding"):
        """Every user's reward of the column's images; image i made with ``mixtures[i mod len(mixtures)]`` (one
        mixture per example draw; ``None``: no user)."""
        images = [None] * len(prompts)
        for d, mix in enumerate(mixtures):
            idx = list(range(d, len(prompts), len(mixtures)))
            hook = serve_users(pipe, mix, space=space, cond_only=args.cond_only, user_scale=args.user_scale)
            made = generate(pipe, [prompts[i] for i in idx], [seeds[i] for i in idx], batch_size=DEFAULT_BATCH_SIZE,
                            hook=hook, **GENERATION)
            for i, im in zip(idx, made):
                images[i] = im
        r = {u.name: u.reward(images) for u in users}
        r["caption_match"] = caption_match(images, prompts)
        return r

    columns = {BASE: score()}  # the base model itself: no LoRA, no branch
    has_lora = (run / LORA_WEIGHT_NAME).is_file()
    pipe = load_pipeline(model, str(run) if has_lora else None, device="cpu")
    spec = load_user_branch(pipe.unet, run)
    table, _ = load_user_embeddings(run)
    encoder = build_user_encoder(spec.encoder)
    # a user's tokens, one per example draw: from their fresh example files, or (--serve stored, training users)
    # the run's stored embedding, the mean of their training sets' features, as `--user ID` does
    tokens = {name: [user_tokens(pipe.unet, encoder.encode(load_examples(f))) for f in files]
              for name, files in example_files.items()}
    for u in TRAIN_USERS:
        tokens.setdefault(u.name, [user_tokens(pipe.unet, table[u.name].mean(0))])
    if has_lora:
        columns[NO_USER] = score()  # the trained model without a user (LoRA on, branch off)
    for u in users:
        columns[u.name] = score([[(1.0, tok)] for tok in tokens[u.name]])
    interp = {"embedding": {}, "prediction": {}}
    a_user, b_user = TRAIN_USERS[0].name, TRAIN_USERS[2].name  # opposite users
    for alpha in ALPHAS:
        for space in interp:
            if alpha in (0.0, 1.0):
                interp[space][alpha] = columns[a_user if alpha == 0.0 else b_user]
            else:
                interp[space][alpha] = score([[(1 - alpha, ta), (alpha, tb)] for ta, tb in
                                              zip(tokens[a_user], tokens[b_user], strict=True)], space)
    timings["eval_s"] = time.time() - t2
    timings["total_s"] = time.time() - t0
    timings["cpu_s"] = time.process_time() - c0

    # 5. tables
    col_names = list(columns)
    lines = [f"| user (oracle) \\ embedding | {' | '.join(col_names)} |", "|---" * (len(col_names) + 1) + "|"]
    checks = {}
    for u in users:
        row = [columns[c][u.name].mean() for c in col_names]
        best = int(np.argmax(row))
        cells = [f"**{v:+.4f}**" if i == best else f"{v:+.4f}" for i, v in enumerate(row)]
        held = f" (held out, {o['examples']} examples)" if u in HELDOUT_USERS else ""
        lines.append(f"| {u.name} ({u.angle:.0f}°){held} | {' | '.join(cells)} |")
        own = columns[u.name][u.name]
        others = {c: columns[c][u.name] for c in col_names if c != u.name}
        rival = max(others, key=lambda c: others[c].mean())
        checks[u.name] = {
            "own": float(own.mean()), "base": float(others[BASE].mean()),
            "best_other": rival, "best_other_reward": float(others[rival].mean()),
            "own_minus_base": float(own.mean() - others[BASE].mean()),
            "own_minus_base_se": paired_se(own, others[BASE]),
            "own_minus_base_se_draws": paired_se(own, others[BASE], o["draws"]),
            "own_minus_best_other": float(own.mean() - others[rival].mean()),
            "own_minus_best_other_se": paired_se(own, others[rival]),
            "own_minus_best_other_se_draws": paired_se(own, others[rival], o["draws"]),
            "own_is_best": bool(own.mean() > max(v.mean() for v in others.values())),
        }
    match = " | ".join(f"{columns[c]['caption_match'].mean():.2f}" for c in col_names)
    lines.append(f"| caption match (toy oracle) | {match} |")
    table_md = "\n".join(lines)
    ilines = [f"| α (0 = {a_user}, 1 = {b_user}) | " + " | ".join(f"{a:g}" for a in ALPHAS) + " |",
              "|---" * (len(ALPHAS) + 1) + "|"]
    monotone = {}
    for space in interp:
        for who in (a_user, b_user):
            vals = [interp[space][a][who].mean() for a in ALPHAS]
            ilines.append(f"| {who} reward, {space} mix | " + " | ".join(f"{v:+.4f}" for v in vals) + " |")
            diffs = np.diff(vals)
            monotone[f"{who}/{space}"] = bool(np.all(diffs < 0) if who == a_user else np.all(diffs > 0))
    interp_md = "\n".join(ilines)
    results = {
        "seed": args.seed, "quick": args.quick, "tie_margin": args.tie_margin, "serve": args.serve,
        "train_every": args.train_every, "user_scale": args.user_scale, "cond_only": args.cond_only,
        "reused_run": args.reuse_run, "base_model": model, "settings": o,
        "config": cfg.to_dict(),
        "generation": GENERATION, "eval_prompts": eval_prompts, "eval_seeds": [seeds[0], seeds[-1]],
        "n_eval_images_per_column": len(prompts), "train_rows_per_user": {u.name: cols["user_id"].count(u.name)
                                                                          for u in trained},
        "example_pool_seed": args.seed + 1, "final_train_metrics": summary.get("final", {}),
        "table": {c: {k: float(v.mean()) for k, v in r.items()} for c, r in columns.items()},
        "interpolation": {s: {str(a): {k: float(v.mean()) for k, v in r.items()} for a, r in d.items()}
                          for s, d in interp.items()},
        "checks": checks, "monotone": monotone, "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "threads": torch.get_num_threads(), "torch": torch.__version__, "platform": platform.platform(),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    text = (f"{table_md}\n\n{interp_md}\n\nseed {args.seed}; {len(prompts)} images per column "
            f"({len(eval_prompts)} held-out prompts x {o['eval_seeds']} seeds {seeds[0]}..{seeds[-1]}); "
            f"{'every user' if args.serve == 'fresh' else 'held-out users'} served from {o['examples']} fresh "
            f"examples, averaged over {o['draws']} disjoint draws; "
            f"tie margin {args.tie_margin:g}; "
            f"base {os.path.relpath(model)}; "
            f"wall time {timings['total_s']:.0f} s, CPU time {timings['cpu_s']:.0f} s "
            f"({torch.get_num_threads()} thread{'s' if torch.get_num_threads() > 1 else ''})\n")
    (out / "table.md").write_text(text)
    print(text)
    print(json.dumps({"checks": checks, "monotone": monotone}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
