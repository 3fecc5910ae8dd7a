"""``python -m samkit.train`` (and ``torchrun ... -m samkit.train``): same as ``samkit train``."""

from __future__ import annotations

import argparse
import sys

from samkit.commands.train import add_arguments, run
from samkit.errors import SamkitError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m samkit.train",
                                     description="Train or fine-tune a SAM (paper App. A).")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except SamkitError as err:
        print(f"samkit train: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
