"""The command-line pieces shared by ``diffalign generate`` and ``diffalign personalize``: their flags, the prompts,
the image files."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .inference import generate

MIX_SPACES = ("embedding", "prediction")
USER_ONLY_FLAGS = ("--branch", "--user-examples", "--user-mix", "--user", "--mix-space", "--user-scale",
                   "--user-cond-only")


def add_generation_args(p: argparse.ArgumentParser) -> None:
    """Prompts, output and sampling flags."""
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", help="text file, one prompt per line")
    p.add_argument("--out", required=True, help="output folder for PNG files")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--device")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])


def add_user_args(p) -> None:
    """The flags that serve a PPD user (:data:`USER_ONLY_FLAGS`); ``diffalign generate`` lists them too and hands
    any command line that uses one to ``diffalign personalize``."""
    p.add_argument("--branch", help="folder with user_branch.safetensors, if not the --lora folder")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--user-examples", help="a user's few-shot examples (.json/.jsonl of prompt/chosen/rejected)")
    who.add_argument("--user-mix", help="users and weights, e.g. a:0.3,b:0.7 (examples files or training user ids)")
    who.add_argument("--user", help="one training user id (or examples file)")
    p.add_argument("--mix-space", default="embedding", choices=MIX_SPACES,
                   help="interpolate user tokens (embedding, default) or noise predictions (prediction)")
    p.add_argument("--user-scale", type=float, help="scale s of the user branch (default: the trained one)")
    p.add_argument("--user-cond-only", action="store_true",
                   help="user tokens on the conditional half of the CFG batch only")


def read_prompts(args) -> list[str]:
    """``--prompt`` values then the lines of ``--prompts``; prints the error and returns [] when there are none."""
    prompts = list(args.prompt)
    if args.prompts:
        prompts += [ln.strip() for ln in Path(args.prompts).read_text().splitlines() if ln.strip()]
    if not prompts:
        print("diffalign: error: give --prompt or --prompts", file=sys.stderr)
    return prompts


def write_images(args, prompts: list[str], pipe, hook=None) -> None:
    """``args.num_images`` images per prompt from ``pipe`` (:func:`diffalign.inference.generate`, one call per image,
    ``hook`` passed on), image n of the run with seed ``args.seed + n``, as ``out/PPPP_II.png`` plus
    ``out/prompts.tsv`` (file, seed, prompt)."""
    from tqdm.auto import tqdm

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kw = {"num_inference_steps": args.steps, "guidance_scale": args.guidance}
    if args.height:
        kw["height"] = args.height
    if args.width:
        kw["width"] = args.width
    jobs = [(i, j, prompt) for i, prompt in enumerate(prompts) for j in range(args.num_images)]
    with open(out / "prompts.tsv", "w") as index:
        for n, (i, j, prompt) in enumerate(tqdm(jobs, desc="generate")):
            seed = args.seed + n
            name = f"{i:04d}_{j:02d}.png"
            generate(pipe, [prompt], [seed], hook=hook, **kw)[0].save(out / name)
            index.write(f"{name}\t{seed}\t{prompt}\n")
    print(f"diffalign: wrote {len(jobs)} images to {out}")
