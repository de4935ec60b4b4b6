"""``diffalign generate``: prompts -> PNG files, from a base model (+ an optional LoRA folder)."""

from __future__ import annotations

import argparse
import sys

from .generation_cli import USER_ONLY_FLAGS, add_generation_args, add_user_args, read_prompts, write_images
from .inference import load_pipeline


def main(argv: list[str]) -> int:
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
    write_images(args, prompts, pipe)
    return 0
