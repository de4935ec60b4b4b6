"""Reproduce a paper-style table (base vs DPO) with ``diffalign eval`` on a GPU.

    python eval/reproduce.py --config eval/configs/sdxl.json --prompt-set partiprompts --out runs/eval
    python eval/reproduce.py --config eval/configs/sd15.json --prompt-set pickapic_test --candidate dpo-released --limit 50
    python eval/make_table.py runs/eval            # -> runs/eval/table.md, ours beside eval/reported.json

For every candidate of the config (released DPO UNet, our DPO LoRA), one ``diffalign eval`` run generates the base
model (B) and the candidate (A) on the same prompts and seeds and scores both with every metric; results land in
``OUT/<config>/<prompt_set>/<candidate>/`` (scores.csv, summary.json, report.html). ``--dry-run`` prints the
commands. Scorer weights default to the official hub ids; pass ``--metric NAME=PATH`` to use local copies.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
METRICS = ["pickscore", "hpsv2", "hpsv2.1", "imagereward", "clip", "aesthetic"]


def commands(config: dict, prompt_set: str, prompts: str, out: Path, args) -> list[list[str]]:
    gen = config["generation"]
    base = config["base"]
    cmds = []
    for name, cand in config["candidates"].items():
        if args.candidate and name not in args.candidate:
            continue
        argv = ["eval", "--model", cand["model"]]
        for key in ("lora", "unet"):
            if cand.get(key):
                argv += [f"--{key}", cand[key]]
        argv += ["--model-b", base["model"]]
        for key in ("lora", "unet"):
            if base.get(key):
                argv += [f"--{key}-b", base[key]]
        argv += ["--name-a", name, "--name-b", "base", "--prompts", prompts]
        argv += [
            "--seeds",
            *map(str, gen["seeds"]),
            "--steps",
            str(gen["steps"]),
            "--guidance",
            str(gen["guidance"]),
        ]
        argv += ["--height", str(gen["height"]), "--width", str(gen["width"]), "--dtype", gen["dtype"]]
        argv += ["--gen-batch-size", str(gen["gen_batch_size"]), "--batch-size", str(args.batch_size)]
        if args.limit:
            argv += ["--limit", str(args.limit)]
        for m in args.metric or METRICS:
            argv += ["--metric", m]
        argv += ["--out", str(out / config["name"] / prompt_set / name)]
        cmds.append(argv)
    return cmds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, required=True, help="eval/configs/{sd15,sdxl}.json")
    p.add_argument("--prompt-set", required=True, help="a key of eval/configs/prompt_sets.json")
    p.add_argument("--candidate", action="append", help="only these candidates (default: all in the config)")
    p.add_argument("--metric", action="append", help=f"NAME or NAME=WEIGHTS (default: {' '.join(METRICS)})")
    p.add_argument("--limit", type=int, default=None, help="first N prompts (smoke runs)")
    p.add_argument("--batch-size", type=int, default=32, help="scoring batch size")
    p.add_argument("--out", type=Path, default=Path("runs/eval"))
    p.add_argument("--dry-run", action="store_true", help="print the diffalign commands and exit")
    args = p.parse_args(argv)

    config = json.loads(args.config.read_text())
    sets = json.loads((HERE / "configs" / "prompt_sets.json").read_text())
    if args.prompt_set not in sets or args.prompt_set.startswith("_"):
        p.error(f"--prompt-set must be one of {[k for k in sets if not k.startswith('_')]}")
    cmds = commands(config, args.prompt_set, sets[args.prompt_set]["prompts"], args.out, args)
    if args.dry_run:
        for c in cmds:
            print("diffalign " + " ".join(shlex.quote(a) for a in c))
        return 0
    from diffalign.cli import main as diffalign_main

    for c in cmds:
        print("diffalign " + " ".join(shlex.quote(a) for a in c), flush=True)
        rc = diffalign_main(c)
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
