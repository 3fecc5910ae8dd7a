"""``samkit`` command line.

Each feature module owns its sub-commands through an ``add_cli(subparsers)`` function, so this
file only wires them together and turns :class:`~samkit.errors.SamkitError` into one line on
stderr and a non-zero exit (never a traceback).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from samkit import __version__
from samkit.errors import SamkitError
from samkit.runtime import default_threads, keep_freed_memory, sample_cpu, set_threads

# The sub-commands, one module each in samkit/commands/; they import torch only when run, so
# `samkit --help` stays fast.
COMMANDS = ("segment", "everything", "train", "weights", "eval", "engine", "export_onnx")

EXIT_USER_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="samkit",
        description="Segment Anything: segment, segment everything, train, evaluate, annotate.",
    )
    parser.add_argument("--version", action="version", version=f"samkit {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"samkit.commands.{name}").add_cli(subparsers)
    for command in _leaf_parsers(subparsers):
        command.add_argument("--threads", type=_positive_int, metavar="N",
                             help="CPU threads for torch (default: one per core that other "
                             "programs leave free, measured as the command starts; see "
                             "README 'Threads')")
    return parser


def _leaf_parsers(subparsers: argparse._SubParsersAction) -> list[argparse.ArgumentParser]:
    """Every parser that runs a command (``engine``'s own sub-commands, not ``engine``)."""
    leaves = []
    for parser in dict.fromkeys(subparsers.choices.values()):  # aliases map to one parser
        nested = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        leaves += _leaf_parsers(nested[0]) if nested else [parser]
    return leaves


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    start = sample_cpu()
    parser = build_parser()
    args = parser.parse_args(argv)  # --help and usage errors exit here, before torch loads
    keep_freed_memory()  # see samkit/runtime.py: the encoder's big buffers stay mapped
    threads = getattr(args, "threads", None)
    if threads is not None or "OMP_NUM_THREADS" not in os.environ:  # the user's choice wins
        import torch  # noqa: F401  (~1-2 s: the window in which the other programs' load is seen)

        set_threads(threads or default_threads(start))
    try:
        return int(args.func(args) or 0)
    except SamkitError as err:
        print(f"samkit: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("samkit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `samkit ... | head -1`: the reader left, nothing to say
        # Python would report the failed flush of stdout at exit: point it at /dev/null.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
