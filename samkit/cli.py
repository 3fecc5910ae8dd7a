"""``samkit`` command line.

Each feature module owns its sub-commands through an ``add_cli(subparsers)`` function, so this
file only wires them together and turns :class:`~samkit.errors.SamkitError` into one line on
stderr and a non-zero exit (never a traceback).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from samkit import __version__
from samkit.errors import SamkitError
from samkit.runtime import keep_freed_memory

# Modules that contribute sub-commands, imported lazily so `samkit --help` stays fast.
COMMAND_MODULES = ("samkit.segment", "samkit.everything", "samkit.train", "samkit.weights", "samkit.eval", "samkit.engine", "samkit.onnx_export")

EXIT_USER_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="samkit",
        description="Segment Anything: segment, segment everything, train, evaluate, annotate.",
    )
    parser.add_argument("--version", action="version", version=f"samkit {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_cli(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    keep_freed_memory()  # see samkit/runtime.py: the encoder's big buffers stay mapped
    try:
        return int(args.func(args) or 0)
    except SamkitError as err:
        print(f"samkit: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("samkit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
