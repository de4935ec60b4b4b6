"""``diffalign eval``: score an image folder, or generate from one or two models and score them; write a per-image
CSV, a JSON summary (mean, std, 95% bootstrap CI per metric and model; win rates of A vs B, ties = 1/2), PNG charts
and a self-contained HTML report (images and charts embedded).

    # A/B on generated images: SD1.5 + DPO LoRA (A) vs SD1.5 (B), same prompts and seeds
    diffalign eval --model runwayml/stable-diffusion-v1-5 --lora ./dpo-lora --model-b runwayml/stable-diffusion-v1-5 \\
        --prompts general --seeds 0 1 --metric pickscore --metric hpsv2.1 --out runs/eval-dpo
    # an existing folder (prompts: CSV/JSONL with file,prompt columns, or a .txt aligned with the sorted files)
    diffalign eval --images ./samples --prompts ./samples/prompts.csv --metric imagereward --out runs/eval-folder
    # tiny local scorers (CI): --metric NAME=PATH
    diffalign eval --images ./samples --prompts p.txt --metric clip=/tmp/tiny-clip --out /tmp/eval
    # the toy world's oracle reward (no weights, offline; only meaningful on toy-world images and their captions,
    # e.g. a .txt of lines like "a red circle on a blue background")
    diffalign eval --model assets/toy-sd --prompts captions.txt --steps 20 --guidance 5 --metric toy --out runs/eval-toy

Prompt sources (``--prompts``): a file (.txt one prompt per line; .csv/.jsonl/.json with a ``prompt`` or
``caption`` field and optionally ``file``), a bundled list name (``toy``, ``general`` in ``assets/prompts``),
``hf:DATASET[:SPLIT[:COLUMN]]`` (``datasets.load_dataset``, e.g. ``hf:nateraw/parti-prompts:train:Prompt``), or
``hpdv2[:STYLE]`` (HPSv2 benchmark prompts, STYLE in anime, concept-art, paintings, photo; all four by default).

Seeds: image (prompt i, seed s) is generated with ``torch.Generator("cpu").manual_seed(1_000_000 * s + i)`` for
every model, so A and B see the same initial noise and their scores are paired by key ``{i:05d}_s{s}``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

from ._errors import WeightsNotFoundError

DEFAULT_METRICS = ["pickscore", "hpsv2.1", "imagereward", "clip", "aesthetic"]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
HPDV2_STYLES = ["anime", "concept-art", "paintings", "photo"]
PROMPT_FREE = {"aesthetic"}


class UsageError(ValueError):
    """A bad argument or input file; printed as one line."""


def assets_dir() -> Path:
    """The shipped prompt lists (``--prompts general`` etc.), package data under ``diffalign/assets/prompts``."""
    from ..toy import assets_path

    return assets_path() / "prompts"


def parse_metric(spec: str) -> tuple[str, str | None]:
    """``"name"`` or ``"name=weights"`` -> (name, weights or None)."""
    from . import WEIGHT_FREE, available

    name, _, weights = spec.partition("=")
    if name not in available():
        raise UsageError(f"unknown metric {name!r}; available: {', '.join(available())}")
    if weights and name in WEIGHT_FREE:
        raise UsageError(f"--metric {spec}: metric {name!r} takes no weights; pass --metric {name}")
    return name, (weights or None)


def check_folder(flag: str, path: Path) -> None:
    """One-line :class:`UsageError` unless ``path`` is an existing folder."""
    if not path.exists():
        raise UsageError(f"{flag} {path}: no such folder")
    if not path.is_dir():
        raise UsageError(f"{flag} {path}: not a folder")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def load_scorer(name: str, weights: str | None, args):
    """``load(name, weights, ...)``; a failure other than missing official weights becomes one line naming the
    metric, the weights and the first line of the underlying error."""
    from . import DEFAULT_WEIGHTS, load

    try:
        return load(
            name, weights=weights, device=args.device, dtype=args.scorer_dtype, batch_size=args.batch_size
        )
    except WeightsNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 -- a wrong folder fails anywhere in transformers/open_clip/torch.load
        where = f"from {weights}" if weights else f"(official weights {DEFAULT_WEIGHTS.get(name, '')})"
        raise UsageError(
            f"--metric {name}{'=' + weights if weights else ''}: cannot load the {name} scorer {where}: "
            f"{type(exc).__name__}: {_first_line(exc)}"
        ) from None


# ----------------------------------------------------------------------------------------------------------- prompts
def _rows_from_file(path: Path) -> list[dict]:
    """Rows ``{"prompt": str, "file": str | None}`` from .txt/.csv/.jsonl/.json."""
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [
            {"prompt": line.strip(), "file": None}
            for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()
        ]
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            raw = list(csv.DictReader(f))
    elif suffix == ".jsonl":
        raw = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif suffix == ".json":
        raw = json.loads(path.read_text(encoding="utf-8"))
        raw = [{"prompt": r} if isinstance(r, str) else r for r in raw]
    else:
        raise UsageError(f"{path}: prompt files must be .txt, .csv, .jsonl or .json")
    rows = []
    for i, r in enumerate(raw):
        prompt = next((r[k] for k in ("prompt", "caption", "Prompt", "text") if k in r), None)
        if prompt is None:
            raise UsageError(f"{path}: row {i} has no 'prompt' or 'caption' field")
        rows.append(
            {
                "prompt": str(prompt),
                "file": next((r[k] for k in ("file", "filename", "image", "file_name") if k in r), None),
            }
        )
    return rows


def load_prompt_rows(source: str) -> list[dict]:
    """Resolve ``--prompts`` (see the module docstring) to rows ``{"prompt", "file"}``."""
    path = Path(source).expanduser()
    if path.is_file():
        return _rows_from_file(path)
    bundled = assets_dir() / f"{source}.txt"
    if bundled.is_file():
        return _rows_from_file(bundled)
    if source.startswith("hf:"):
        dataset, _, rest = source[3:].partition(":")
        split, _, column = rest.partition(":")
        from . import _weights

        if _weights._offline_env() or not _weights._reachable(_weights._hub_endpoint()):
            raise UsageError(
                f"prompt dataset {dataset!r} cannot be downloaded (offline); export it to a .txt file where there is network and pass that file"
            )
        from datasets import load_dataset

        ds = load_dataset(dataset, split=split or "train")
        column = column or next(
            (c for c in ("Prompt", "prompt", "caption", "text") if c in ds.column_names), None
        )
        if column is None:
            raise UsageError(
                f"{dataset}: no prompt column among {ds.column_names}; use hf:{dataset}:SPLIT:COLUMN"
            )
        return [{"prompt": str(p), "file": None} for p in ds[column]]
    if source == "hpdv2" or source.startswith("hpdv2:"):
        from . import _weights

        styles = [source.split(":", 1)[1]] if ":" in source else HPDV2_STYLES
        rows = []
        for style in styles:
            f = _weights.hub_file(
                "zhwang/HPDv2",
                f"benchmark/{style}.json",
                scorer="prompts",
                repo_type="dataset",
                hint=f"download benchmark/{style}.json from the zhwang/HPDv2 dataset and pass it as --prompts FILE.json",
            )
            rows += [{"prompt": p, "file": None} for p in json.loads(Path(f).read_text(encoding="utf-8"))]
        return rows
    raise UsageError(
        f"--prompts {source!r}: not a file, a bundled list ({', '.join(sorted(p.stem for p in assets_dir().glob('*.txt')))}), hf:DATASET or hpdv2"
    )


def folder_items(images_dir: Path, prompt_rows: list[dict] | None, needs_prompts: bool) -> list[dict]:
    """Items ``{"key", "path", "prompt", "prompt_idx"}`` for the images of a folder, with their prompts."""
    files = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UsageError(f"{images_dir}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    if prompt_rows is None:
        if needs_prompts:
            raise UsageError("--prompts is required to score images with prompt-conditioned metrics")
        prompts = [""] * len(files)
    elif all(r["file"] for r in prompt_rows):
        by_name = {Path(r["file"]).name: r["prompt"] for r in prompt_rows}
        missing = [f.name for f in files if f.name not in by_name]
        if missing:
            raise UsageError(f"no prompt for {len(missing)} image(s), e.g. {missing[0]!r}")
        prompts = [by_name[f.name] for f in files]
    else:
        if len(prompt_rows) != len(files):
            raise UsageError(
                f"{len(files)} images in {images_dir} but {len(prompt_rows)} prompts; a .txt must align with the sorted files"
            )
        prompts = [r["prompt"] for r in prompt_rows]
    return [
        {"key": f.stem, "path": f, "prompt": p, "prompt_idx": i, "seed": ""}
        for i, (f, p) in enumerate(zip(files, prompts))
    ]


# -------------------------------------------------------------------------------------------------------- generation
def generate(
    model: str,
    lora: str | None,
    prompts: list[str],
    seeds: list[int],
    out_dir: Path,
    args,
    unet: str | None = None,
) -> list[dict]:
    """Generate one image per (prompt, seed) into ``out_dir``; return items like :func:`folder_items`.

    Seed rule (module doc): image (prompt i, seed s) from its own ``torch.Generator("cpu").manual_seed(1_000_000 * s +
    i)`` (:func:`diffalign.inference.generate`), ``args.gen_batch_size`` images per pipeline call. ``unet``: a diffusers
    UNet (hub id or dir with a ``unet/`` subfolder, e.g. the released Diffusion-DPO ``mhdang/dpo-sd1.5-text2image-v1``)
    in place of the model's; ``lora``: LoRA weights loaded on top."""
    from tqdm.auto import tqdm

    from ..inference import generate as generate_images
    from ..inference import load_pipeline
    from .base import parse_dtype

    pipe = load_pipeline(model, lora, args.device, parse_dtype(args.dtype), unet=unet)
    if getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None  # scoring needs the raw samples
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(i, s) for s in seeds for i in range(len(prompts))]
    items = []
    extra = {"num_inference_steps": args.steps}
    if args.height:
        extra["height"] = args.height
    if args.width:
        extra["width"] = args.width
    if args.guidance is not None:
        extra["guidance_scale"] = args.guidance
    bar = tqdm(
        total=len(jobs),
        desc=f"generate {Path(model).name}{' + ' + Path(lora).name if lora else ''}",
        unit="img",
    )
    for start in range(0, len(jobs), args.gen_batch_size):
        chunk = jobs[start : start + args.gen_batch_size]
        images = generate_images(
            pipe, [prompts[i] for i, _ in chunk], [1_000_000 * s + i for i, s in chunk], batch_size=len(chunk), **extra
        )
        for (i, s), image in zip(chunk, images):
            key = f"{i:05d}_s{s}"
            path = out_dir / f"{key}.png"
            image.save(path)
            items.append({"key": key, "path": path, "prompt": prompts[i], "prompt_idx": i, "seed": s})
        bar.update(len(chunk))
    bar.close()
    del pipe
    return items


# ----------------------------------------------------------------------------------------------------------- scoring
def score_items(
    items_by_model: dict[str, list[dict]], metrics: list[tuple[str, str | None]], out: Path, args
) -> tuple[list[dict], dict]:
    """Score every model's items with every metric; return (records, extra summary fields)."""
    import torch
    from tqdm.auto import tqdm

    records = {m: [] for m in items_by_model}
    for model, items in items_by_model.items():
        for it in items:
            records[model].append(
                {
                    "model": model,
                    "key": it["key"],
                    "prompt_idx": it["prompt_idx"],
                    "seed": it["seed"],
                    "prompt": it["prompt"],
                    "image": os.path.relpath(it["path"], out),
                }
            )
    extra = {}
    for name, weights in metrics:
        scorer = load_scorer(name, weights, args)
        per_model = {}
        for model, items in items_by_model.items():
            values = []
            bar = tqdm(total=len(items), desc=f"{name} [{model}]", unit="img")
            for start in range(0, len(items), args.batch_size):
                chunk = items[start : start + args.batch_size]
                images = [_open_rgb(it["path"]) for it in chunk]
                values.append(scorer.score(images, [it["prompt"] for it in chunk]))
                bar.update(len(chunk))
            bar.close()
            per_model[model] = torch.cat(values) if values else torch.zeros(0)
            for rec, v in zip(records[model], per_model[model].tolist()):
                rec[name] = v
        if name == "pickscore" and len(per_model) == 2:
            from .pickscore import preference_probability

            (a_name, a), (b_name, b) = per_model.items()
            b_by_key = {r["key"]: v for r, v in zip(records[b_name], b.tolist())}
            pairs = [
                (v, b_by_key[r["key"]]) for r, v in zip(records[a_name], a.tolist()) if r["key"] in b_by_key
            ]
            if pairs:
                sa, sb = torch.tensor(pairs).T
                extra["pickscore_preference"] = float(preference_probability(sa, sb).mean())
        del scorer
    return [r for recs in records.values() for r in recs], extra


def _open_rgb(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise UsageError(f"{path}: cannot read image: {_first_line(exc)}") from None


# --------------------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    from . import available

    p = argparse.ArgumentParser(
        prog="diffalign eval",
        description="Score images with reward models (PickScore, HPSv2/v2.1, ImageReward, CLIP score, aesthetic, "
        "and the toy world's oracle reward 'toy'); win rates of model A vs B; CSV/JSON and a self-contained HTML "
        "report.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    src = p.add_argument_group("what to score (A, and optionally B)")
    src.add_argument("--images", type=Path, help="folder of images to score (model A)")
    src.add_argument("--images-b", type=Path, help="second folder (model B), paired by file name")
    src.add_argument("--model", help="diffusers pipeline dir or hub id to generate from (model A)")
    src.add_argument("--lora", help="LoRA dir loaded into model A with load_lora_weights")
    src.add_argument(
        "--unet",
        help="UNet (hub id or dir with unet/) swapped into model A, e.g. mhdang/dpo-sd1.5-text2image-v1",
    )
    src.add_argument("--model-b", help="second pipeline (model B); same prompts and seeds")
    src.add_argument("--lora-b", help="LoRA for model B")
    src.add_argument("--unet-b", help="UNet swapped into model B")
    src.add_argument(
        "--name-a", default=None, help="label of A in the report (default: A or the folder/model name)"
    )
    src.add_argument("--name-b", default=None, help="label of B in the report")
    src.add_argument(
        "--prompts",
        help="prompt file, bundled list (toy, general), hf:DATASET[:SPLIT[:COLUMN]] or hpdv2[:STYLE]",
    )
    src.add_argument("--limit", type=int, default=None, help="use the first N prompts")

    gen = p.add_argument_group("generation")
    gen.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds; one image per prompt and seed")
    gen.add_argument("--steps", type=int, default=50, help="inference steps")
    gen.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="guidance scale (pipeline default if unset; papers: 7.5 SD1.5, 5.0 SDXL)",
    )
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--gen-batch-size", type=int, default=4)
    gen.add_argument("--dtype", default=None, help="pipeline dtype: fp32 (default), fp16, bf16")

    sc = p.add_argument_group("scoring")
    sc.add_argument(
        "--metric",
        action="append",
        default=None,
        help=f"NAME or NAME=WEIGHTS (repeatable); NAME in {', '.join(available())}; default "
        f"{','.join(DEFAULT_METRICS)}. 'toy' is the toy world's oracle reward: no weights, offline, only meaningful "
        "on toy-world images and captions",
    )
    sc.add_argument("--batch-size", type=int, default=16)
    sc.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    sc.add_argument("--scorer-dtype", default=None, help="scorer dtype: fp32 (default, exact), fp16, bf16")
    sc.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for CIs")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    return p


def run(args) -> dict:
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if bool(args.images) == bool(args.model):
        raise UsageError("pass exactly one of --images DIR or --model DIR_OR_ID")
    if args.images_b and not args.images:
        raise UsageError("--images-b needs --images")
    if args.model_b and not args.model:
        raise UsageError("--model-b needs --model")
    metrics = [parse_metric(m) for m in (args.metric or DEFAULT_METRICS)]
    if args.images:
        check_folder("--images", args.images)
    if args.images_b:
        check_folder("--images-b", args.images_b)
    needs_prompts = any(name not in PROMPT_FREE for name, _ in metrics)
    rows = load_prompt_rows(args.prompts) if args.prompts else None
    if rows is not None and args.limit:
        rows = rows[: args.limit]
    if rows is not None and any(name == "toy" for name, _ in metrics):
        from .toy_oracle import check_prompts

        try:  # before generating or scoring anything
            check_prompts([r["prompt"] for r in rows])
        except ValueError as exc:
            raise UsageError(f"--metric toy: {_first_line(exc)}") from None
    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    items: dict[str, list[dict]] = {}
    started = time.time()
    if args.images:
        name_a = args.name_a or ("A" if args.images_b else args.images.name or "A")
        items[name_a] = folder_items(args.images, rows, needs_prompts)
        if args.images_b:
            items[args.name_b or "B"] = folder_items(args.images_b, rows, needs_prompts)
    else:
        if not rows:
            raise UsageError("--model needs --prompts")
        prompts = [r["prompt"] for r in rows]
        name_a = args.name_a or "A"
        items[name_a] = generate(
            args.model, args.lora, prompts, args.seeds, out / "images" / name_a, args, unet=args.unet
        )
        if args.model_b:
            name_b = args.name_b or "B"
            items[name_b] = generate(
                args.model_b,
                args.lora_b,
                prompts,
                args.seeds,
                out / "images" / name_b,
                args,
                unet=args.unet_b,
            )
    if len(items) == 2 and len(set(items)) != 2:
        raise UsageError("--name-a and --name-b must differ")

    records, extra = score_items(items, metrics, out, args)
    from .report import write_report

    meta = {
        "source": "images" if args.images else "generated",
        "models": dict(
            zip(
                items,
                [
                    _describe(args.images, args.model, args.unet, args.lora),
                    _describe(args.images_b, args.model_b, args.unet_b, args.lora_b),
                ],
            )
        ),
        "metrics": {name: weights or "official" for name, weights in metrics},
        "prompts": args.prompts,
        "seeds": args.seeds if args.model else None,
        "device": args.device,
        "scorer_dtype": args.scorer_dtype or "fp32",
        "seconds": round(time.time() - started, 1),
    }
    names = [name for name, _ in metrics]
    return write_report(out, records, list(items), names, meta=meta, extra=extra, n_boot=args.n_boot)


def _describe(images, model, unet, lora) -> str | None:
    if images:
        return str(images)
    if not model:
        return None
    return model + (f" + unet {unet}" if unet else "") + (f" + lora {lora}" if lora else "")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    from ..models.loading import ModelNotFoundError
    from ..models.lora import LoRAMismatchError

    try:
        summary = run(args)
    except (WeightsNotFoundError, UsageError, ModelNotFoundError, LoRAMismatchError, FileNotFoundError) as exc:
        print(f"diffalign eval: error: {exc}", file=sys.stderr)
        return 2
    for metric, per_model in summary["metrics"].items():
        line = "  ".join(
            f"{m}={s['mean']:.4g} [{s['ci_low']:.4g}, {s['ci_high']:.4g}]" for m, s in per_model.items()
        )
        rate = summary["win_rates"].get(metric)
        print(f"{metric:12s} {line}" + (f"  win rate {rate['rate']:.3f}" if rate else ""))
    print(f"wrote {args.out / 'scores.csv'}, {args.out / 'summary.json'}, {args.out / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
