"""``diffalign robot``: train and evaluate the robot preference heads on Detour2D.

    diffalign robot train CONFIG.yaml [key=value ...] [--overwrite]
    diffalign robot eval RUN_DIR [--n-eval 256] [--ras-n 1,2,4,8,16] [--seed 0]
    diffalign robot report [--seeds 0 1 2] [--out docs/robot] [key=value ...]

``train`` runs imitation, then the config's ``head`` (``imitation``, ``deformpam`` or ``rapl``), and writes
``RUN_DIR/{imitation,aligned}/`` policies, ``rapl_encoder.safetensors`` (RAPL), ``config.json`` and ``metrics.json``.
Overrides use dotted keys into the YAML, e.g. ``experiment.bc_steps=200 experiment.deformpam.beta=50``.
``eval`` scores a run on held-out states: imitation, the aligned policy, reward-guided selection (implicit reward of
aligned vs imitation) for each N, and the oracle best-of-N. ``report`` runs the whole toy study
(``scripts/robot_toy.py``) and writes the table and plot.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

HEADS = ("imitation", "deformpam", "rapl")


def load_config(path: str | Path, overrides: list[str] | None = None) -> dict:
    """YAML file + ``a.b.c=value`` overrides (values parsed as YAML scalars)."""
    import yaml

    cfg = apply_overrides(yaml.safe_load(Path(path).read_text()) or {}, overrides or [])
    head = cfg.get("head", "deformpam")
    if head not in HEADS:
        raise ValueError(f"`head` must be one of {HEADS}. Got {head!r}.")
    if cfg.get("task", "detour2d") != "detour2d":
        raise ValueError(f"`task` must be detour2d (the only bundled robot task). Got {cfg.get('task')!r}.")
    if "output_dir" not in cfg:
        raise ValueError("the config needs an `output_dir`")
    return cfg


def apply_overrides(cfg: dict, items: list[str]) -> dict:
    """Set ``a.b.c=value`` items (values parsed as YAML) into the nested dict ``cfg``; returns ``cfg``."""
    import yaml

    for item in items:
        if "=" not in item:
            raise ValueError(f"override must be key=value, got {item!r}")
        key, raw = item.split("=", 1)
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {key!r}: {p!r} is not a section")  # noqa: TRY004 (a usage error)
        node[leaf] = yaml.safe_load(raw)
    return cfg


def build_experiment_config(cfg: dict):
    """``Detour2DConfig`` from the ``experiment`` section, with the key checks and type coercion of
    ``diffalign train`` (``lr=1e-4`` is a float, an unknown key is one line); nested sections override the toy's
    defaults field by field."""
    import dataclasses

    from ..training.config import from_dict
    from .experiments import Detour2DConfig

    section = dict(cfg.get("experiment") or {})
    nested = {k: section.pop(k) for k in ("policy", "deformpam", "rapl") if isinstance(section.get(k), dict)}
    return dataclasses.replace(from_dict(Detour2DConfig, section, "experiment"), **nested)


def train(cfg: dict, *, overwrite: bool = False, log=print) -> Path:
    import torch
    from safetensors.torch import save_file

    from . import experiments as ex

    out = Path(cfg["output_dir"])
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; pass --overwrite to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    exp = build_experiment_config(cfg)
    (out / "config.json").write_text(json.dumps({**cfg, "experiment": exp.to_dict()}, indent=2))
    metrics: dict = {"head": cfg.get("head", "deformpam"), "seed": exp.seed}

    bc = ex.train_imitation(exp, log_every=max(1, exp.bc_steps // 5))
    bc.save_pretrained(out / "imitation")
    obs = ex.eval_observations(exp)
    metrics["imitation"] = ex.evaluate_policy(bc, obs, seed=exp.seed)
    log(f"imitation: {metrics['imitation']}")

    head = metrics["head"]
    if head == "deformpam":
        pairs = ex.collect_ranked_pairs(bc, exp)
        torch.save({f: getattr(pairs, f) for f in ("obs", "action_0", "action_1", "label_0")}, out / "pairs.pt")
        aligned = ex.align_policy(bc, pairs, exp, log_every=max(1, exp.deformpam.steps // 5))
        metrics["n_pairs"] = len(pairs)
    elif head == "rapl":
        triplets = ex.rapl_triplets(bc, exp)
        unaligned, rapl = ex.fit_rapl(triplets, exp, log_every=max(1, exp.rapl.epochs // 5))
        save_file({k: v.contiguous() for k, v in rapl.encoder.state_dict().items()}, str(out / "rapl_encoder.safetensors"))
        rollouts, demos = ex.rapl_eval_set(bc, exp)
        metrics["rho_unaligned"] = ex.rapl_spearman(unaligned, rollouts, demos)
        metrics["rho_rapl"] = ex.rapl_spearman(rapl, rollouts, demos)
        log(f"Spearman rho: unaligned {metrics['rho_unaligned']:.3f} -> RAPL {metrics['rho_rapl']:.3f}")
        pairs = ex.rapl_ranked_pairs(bc, rapl, exp)
        aligned = ex.align_policy(bc, pairs, exp, log_every=max(1, exp.deformpam.steps // 5))
        metrics["n_pairs"] = len(pairs)
    else:
        aligned = None
    if aligned is not None:
        aligned.policy.save_pretrained(out / "aligned")
        metrics["aligned"] = ex.evaluate_policy(aligned.policy, obs, seed=exp.seed)
        log(f"aligned: {metrics['aligned']}")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return out


def evaluate(run_dir: str | Path, *, n_eval: int | None = None, ras_ns=None, seed: int | None = None) -> dict:
    from . import experiments as ex
    from .modeling_deformpam import DeformPAMHead
    from .modeling_diffusion_policy import DiffusionActionPolicy

    run_dir = Path(run_dir)
    saved = json.loads((run_dir / "config.json").read_text())
    exp = build_experiment_config(saved)
    if seed is not None:
        exp.seed = seed
    ns = tuple(ras_ns or exp.ras_ns)
    obs = ex.eval_observations(exp, n_eval)
    bc = DiffusionActionPolicy.from_pretrained(run_dir / "imitation").eval()
    pool = ex.candidate_pool(bc, obs, max(ns), seed=70_000 + exp.seed)
    terms = ex.oracle_of_actions(obs, pool)
    result: dict = {"run": str(run_dir), "n_eval": len(obs), "seed": exp.seed,
                    "imitation": {k: float(terms[k][:, 0].mean()) for k in ex.METRICS},
                    "oracle_best_of_n": ex.oracle_best_of_n(terms, ns)}
    if (run_dir / "aligned").exists():
        aligned = DiffusionActionPolicy.from_pretrained(run_dir / "aligned").eval()
        result["aligned"] = ex.evaluate_policy(aligned, obs, seed=70_000 + exp.seed)
        head = DeformPAMHead(aligned, exp.deformpam, reference=bc)
        result["ras"] = ex.ras_rows(head, obs, pool, ns, seed=exp.seed, pool_oracle=terms)
    return result


def format_eval(result: dict) -> str:
    lines = ["| row | violation | reward | success |", "|---|---|---|---|"]
    row = lambda name, m: f"| {name} | {m['violation']:.3f} | {m['reward']:.3f} | {m['success']:.3f} |"
    lines.append(row("imitation", result["imitation"]))
    if "aligned" in result:
        lines.append(row("aligned policy", result["aligned"]))
        for n, m in result["ras"].items():
            lines.append(row(f"RAS N={n}", m))
    for n, m in result["oracle_best_of_n"].items():
        lines.append(f"| oracle best-of-{n} | | {m['reward']:.3f} | |")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffalign robot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="imitation + a preference head on Detour2D")
    t.add_argument("config")
    t.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    t.add_argument("--overwrite", action="store_true")
    e = sub.add_parser("eval", help="evaluate a run directory")
    e.add_argument("run_dir")
    e.add_argument("--n-eval", type=int, default=None)
    e.add_argument("--ras-n", default=None, help="comma-separated N, e.g. 1,2,4,8,16")
    e.add_argument("--seed", type=int, default=None)
    r = sub.add_parser("report", help="the full toy study: table and plot")
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    r.add_argument("--out", default="docs/robot")
    r.add_argument("overrides", nargs="*", help="key=value overrides of Detour2DConfig")
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "train":
            out = train(load_config(args.config, args.overrides), overwrite=args.overwrite)
            print(f"wrote {out}")
        elif args.command == "eval":
            ns = [int(x) for x in args.ras_n.split(",")] if args.ras_n else None
            result = evaluate(args.run_dir, n_eval=args.n_eval, ras_ns=ns, seed=args.seed)
            (Path(args.run_dir) / "eval.json").write_text(json.dumps(result, indent=2, default=float))
            print(format_eval(result))
        else:
            from .experiments import run_report

            overrides = apply_overrides({}, args.overrides)
            table, plot = run_report(args.seeds, args.out, overrides)
            print(f"wrote {table} and {plot}")
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        print(f"diffalign robot: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
