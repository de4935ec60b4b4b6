"""``diffalign`` command line: one entry point, one sub-command per job.

    diffalign train CONFIG.yaml [key=value ...] [--resume] [--overwrite]
    diffalign generate --model DIR_OR_ID [--lora DIR] --prompt "..." --out DIR
    diffalign personalize --model ID --lora RUN --user-examples FILE | --user-mix a:0.3,b:0.7 ...
    diffalign demo [--out DIR]
    diffalign eval ...            (see ``diffalign eval --help``)
    diffalign robot train|eval    (see ``diffalign robot --help``)

Each sub-command lives in its own module and exposes ``main(argv) -> int``; this file only dispatches, so
``import diffalign.cli`` stays cheap and a missing optional piece fails with one line, not a traceback.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("diffalign.training.cli", "train a model from a YAML config"),
    "generate": ("diffalign.generate", "generate images from prompts (base model + optional LoRA)"),
    "personalize": ("diffalign.personalization.cli", "generate for a user of a PPD model (few-shot, user mixes)"),
    "demo": ("diffalign.toy.demo", "run Diffusion-DPO (or --objective grpo|nft) end to end on the bundled toy world (CPU, minutes)"),
    "eval": ("diffalign.evaluators.cli", "score images with reward models; win rates and reports"),
    "robot": ("diffalign.robot.cli", "robot-policy preference heads (DeformPAM, RAPL)"),
}


def _usage() -> str:
    lines = ["usage: diffalign <command> [args]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from diffalign import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"diffalign: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
