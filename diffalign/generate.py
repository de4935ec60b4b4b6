"""``diffalign generate``: prompts -> PNG files, from a base model (+ an optional LoRA folder)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .inference import generate, load_pipeline  # noqa: F401  (re-exported: diffalign.generate.load_pipeline)


def add_generation_args(p: argparse.ArgumentParser) -> None:
    """Prompts, output and sampling flags shared by ``diffalign generate`` and ``diffalign personalize``."""
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


def read_prompts(args) -> list[str]:
    """``--prompt`` values then the lines of ``--prompts``; prints the error and returns [] when there are none."""
    prompts = list(args.prompt)
    if args.prompts:
        prompts += [ln.strip() for ln in Path(args.prompts).read_text().splitlines() if ln.strip()]
    if not prompts:
        print("diffalign: error: give --prompt or --prompts", file=sys.stderr)
    return prompts


def write_images(args, prompts: list[str], render) -> None:
    """``args.num_images`` images per prompt, image n with seed ``args.seed + n``, as ``out/PPPP_II.png`` plus
    ``out/prompts.tsv`` (file, seed, prompt). ``render(prompt, seed, **sampling_kwargs)`` returns a PIL image."""
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
            render(prompt, seed, **kw).save(out / name)
            index.write(f"{name}\t{seed}\t{prompt}\n")
    print(f"diffalign: wrote {len(jobs)} images to {out}")


def main(argv: list[str]) -> int:
    from .personalization.cli import USER_ONLY_FLAGS, add_user_args

    if any(a.split("=")[0] in USER_ONLY_FLAGS for a in argv):  # a PPD model served to a user
        from .personalization.cli import main as personalize

        return personalize(argv)
    from .models.loading import ModelNotFoundError

    p = argparse.ArgumentParser(prog="diffalign generate")
    p.add_argument("--model", required=True, help="hub id or local diffusers folder")
    p.add_argument("--lora", help="folder with pytorch_lora_weights.safetensors (a diffalign train output_dir)")
    add_generation_args(p)
    add_user_args(p.add_argument_group("a PPD model served to a user (any of these runs `diffalign personalize`)"))
    args = p.parse_args(argv)
    prompts = read_prompts(args)
    if not prompts:
        return 2
    try:
        pipe = load_pipeline(args.model, args.lora, args.device, args.dtype)
    except (ModelNotFoundError, OSError, ValueError) as err:
        print(f"diffalign: error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    write_images(args, prompts, lambda prompt, seed, **kw: generate(pipe, [prompt], [seed], **kw)[0])
    return 0
