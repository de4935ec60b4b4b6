"""``python -m diffalign.toy {pretrain,pretrain-flow,make-pairs} ...``: build the toy world's shipped assets."""

from __future__ import annotations

import sys

USAGE = """usage: python -m diffalign.toy <command> [args]

commands:
  pretrain       train the toy text-to-image pipeline from scratch (assets/toy-sd)
  pretrain-flow  train the toy SD3-style flow pipeline from scratch (assets/toy-flow)
  make-pairs     sample and oracle-label a Pick-a-Pic-schema preference set (assets/toy-pairs, toy-flow-pairs)"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "pretrain":
        from .pretrain import main as run
    elif command == "pretrain-flow":
        from .flow_pretrain import main as run
    elif command == "make-pairs":
        from .pairs import main as run
    else:
        print(f"unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return int(run(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
