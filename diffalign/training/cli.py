"""``diffalign train CONFIG.yaml [key=value ...] [--resume | --overwrite]``."""

from __future__ import annotations

import argparse
import sys

from ..data import DatasetFormatError
from ..evaluators import WeightsNotFoundError
from ..models import ModelNotFoundError
from ..online import RewardServerError
from .config import ConfigError, load_config

EPILOG = """examples:
  diffalign train configs/sd15_dpo.yaml
  diffalign train configs/sd15_dpo.yaml objective.beta=2000 optimizer.learning_rate=1e-5 max_steps=500
  diffalign train configs/sd15_dpo.yaml --resume            # continue the run in output_dir
  accelerate launch -m diffalign.cli train configs/sdxl_dpo.yaml   # many GPUs
"""

USER_ERRORS = (ConfigError, ModelNotFoundError, DatasetFormatError, ImportError, FileNotFoundError,
               WeightsNotFoundError)
USAGE = "usage: diffalign train CONFIG.yaml [key=value ...] [--resume | --overwrite]"


def main(argv: list[str]) -> int:
    from .trainer import (
        LaunchError,
        NonFiniteError,
        ResumeMismatchError,
        RunExistsError,
        UnreadableDataError,
        trainer_class,
    )

    parser = argparse.ArgumentParser(prog="diffalign train", epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. objective.beta=2000")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    parser.add_argument("--overwrite", action="store_true", help="discard checkpoints already in output_dir")
    if not argv:
        print(f"{USAGE}\ndiffalign train: error: a config file is required (e.g. configs/sd15_dpo.yaml)",
              file=sys.stderr)
        return 2
    args = parser.parse_intermixed_args(argv)  # flags and key=value overrides in any order
    try:
        cfg = load_config(args.config, args.overrides)
        trainer = trainer_class(cfg)(cfg).setup(resume=args.resume, overwrite=args.overwrite)
    except (*USER_ERRORS, RunExistsError, ResumeMismatchError, LaunchError) as err:
        kind = "config error" if isinstance(err, ConfigError) else "error"
        print(f"diffalign: {kind}: {err}", file=sys.stderr)
        return 2
    try:
        summary = trainer.train()
    except (NonFiniteError, UnreadableDataError, RewardServerError) as err:
        print(f"diffalign: error: {err}", file=sys.stderr)
        return 1
    main_process = trainer.accelerator.is_main_process
    trainer.cleanup()
    if main_process:
        print(f"diffalign: done, {summary['steps']} steps; adapter/weights in {cfg.output_dir}")
    return 0
