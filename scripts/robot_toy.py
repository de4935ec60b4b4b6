"""The Detour2D study for the robot preference heads (DeformPAM and RAPL), on CPU.

    OMP_NUM_THREADS=1 python scripts/robot_toy.py --seeds 0 1 2 --out docs/robot

For each seed: imitation on three-mode demonstrations; oracle-ranked preferences turned into pairs with DeformPAM's
rule; Diffusion-DPO (and sign-flipped labels); reward-guided selection for N in {1, 2, 4, 8, 16} and the oracle
best-of-N; RAPL encoder alignment on rendered rollouts with a distractor (Spearman ρ against an unaligned encoder and
against flipped triplets) and DPO on RAPL-ranked rollouts. Writes ``table.md``, ``plot.png`` and ``results.json``.
The same study is ``diffalign robot report``; every step lives in :mod:`diffalign.robot.experiments`.
"""

from __future__ import annotations

import argparse
import sys

import torch

from diffalign.robot.cli import apply_overrides
from diffalign.robot.experiments import run_report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="docs/robot")
    p.add_argument("overrides", nargs="*", help="Detour2DConfig key=value overrides, e.g. deformpam.beta=50")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    table, plot = run_report(args.seeds, args.out, apply_overrides({}, args.overrides))
    print(table.read_text())
    print(f"wrote {table} and {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
