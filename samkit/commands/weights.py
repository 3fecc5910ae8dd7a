"""``samkit weights list`` and ``samkit weights fetch``: the official checkpoints' cache."""

from __future__ import annotations

import argparse
from pathlib import Path

from samkit.weights import (CLIP_REGISTRY, REGISTRY, cache_dir, cached_path, clip_folder,
                            default_model_status, fetch, fetch_clip, human_size)


_CACHE_HELP = "cache directory (default: $SAMKIT_CACHE, $XDG_CACHE_HOME/samkit or ~/.cache/samkit)"


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``samkit weights list`` and ``samkit weights fetch``."""
    weights = subparsers.add_parser("weights", help="list and download official checkpoints")
    commands = weights.add_subparsers(dest="weights_command", metavar="ACTION", required=True)

    listing = commands.add_parser("list", help="show the official checkpoints and the cache")
    listing.add_argument("--cache-dir", type=Path, metavar="DIR", help=_CACHE_HELP)
    listing.set_defaults(func=_cli_list)

    fetching = commands.add_parser("fetch", help="download and verify a checkpoint")
    # No argparse `choices`: an unknown name should be one SamkitError line, not a usage dump.
    names = sorted(REGISTRY) + sorted(CLIP_REGISTRY)
    fetching.add_argument("name", metavar="NAME", help=f"one of {', '.join(names)} (a CLIP "
                          "downloads as a folder, for --clip)")
    fetching.add_argument("--cache-dir", type=Path, metavar="DIR", help=_CACHE_HELP)
    fetching.add_argument("--url", help="download from this mirror instead of the official URL "
                          "(for a CLIP: a base URL standing in for https://huggingface.co)")
    fetching.set_defaults(func=_cli_fetch)


def _cli_list(args: argparse.Namespace) -> int:
    rows = [("NAME", "MODEL", "SIZE", "CACHED")]
    for name in sorted(REGISTRY):
        spec = REGISTRY[name]
        path = cached_path(name, args.cache_dir)
        cached = str(path) if path.exists() else "-"
        rows.append((name, spec.model_type, human_size(spec.size_bytes), cached))
    for name in sorted(CLIP_REGISTRY):
        folder = clip_folder(name, args.cache_dir)
        cached = str(folder) if (folder / "model.safetensors").exists() else "-"
        rows.append((name, "clip", "?", cached))
    widths = [max(len(cell) for cell in column) for column in zip(*rows, strict=True)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    print(f"cache: {args.cache_dir or cache_dir()}")
    print(f"default model: {default_model_status()}")
    return 0


def _cli_fetch(args: argparse.Namespace) -> int:
    if args.name in CLIP_REGISTRY:
        print(fetch_clip(args.name, cache=args.cache_dir, base_url=args.url))
        return 0
    print(fetch(args.name, cache=args.cache_dir, url=args.url))
    return 0
