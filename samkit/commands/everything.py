"""``samkit everything``: segment everything in an image or a folder (docs/everything.md)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from samkit.everything import (DEFAULT_OUT, GeneratorSpec, collect_images, resolve_shard,
                               run_everything, select_shard, under_torchrun)
from samkit.io import prepare_out_dir
from samkit.commands.arguments import (add_generator_arguments, add_model_arguments,
                                       generator_filters)
from samkit.loading import resolve_model


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``samkit everything``."""
    parser = subparsers.add_parser(
        "everything",
        help="segment everything in an image or a folder of images (SA-1B-style JSON)",
        description="Automatic mask generation for IMAGE or every image under DIR: one "
        "SA-1B-style JSON of COCO-RLE masks per image. Resumable (done images are skipped), "
        "shardable (--shard i/n; automatic under torchrun), and a bad file in a folder is "
        "reported and skipped (exit 1 at the end).",
    )
    parser.add_argument("source", metavar="IMAGE|DIR", type=Path)
    parser.add_argument("--glob", metavar="PATTERN",
                        help="files to take under DIR, e.g. '**/*.jpg' (default: every image "
                        "file, recursively, skipping hidden ones)")
    parser.add_argument("-o", "--out", type=Path, default=DEFAULT_OUT, metavar="OUTDIR",
                        help=f"output folder (default {DEFAULT_OUT})")
    add_model_arguments(parser, device_help="default: cuda if available (cuda:LOCAL_RANK under "
                        "torchrun), else cpu")
    add_generator_arguments(parser)
    parser.add_argument("--overlay", action="store_true",
                        help="also write <name>.overlay.png with the masks drawn")
    parser.add_argument("--shard", metavar="i/n",
                        help="do only shard i (0-based) of n (default under torchrun: "
                        "RANK/WORLD_SIZE)")
    parser.add_argument("--engine", choices=("local", "ray"), default="local",
                        help="local: this process; ray: a Ray Data pipeline "
                        "(pip install samkit[ray])")
    parser.add_argument("--ray-address", metavar="ADDR",
                        help="Ray cluster to join, e.g. 'auto' (default: start a local one)")
    parser.add_argument("--ray-actors", type=int, metavar="N",
                        help="model replicas (default: one per GPU in the cluster, else 1)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``samkit everything``: find, shard, resume, segment, summarise."""
    choice = resolve_model(args.model, args.checkpoint)
    items = collect_images(args.source, args.glob, exclude=args.out)
    single = args.source.is_file()
    shard = resolve_shard(args.shard, os.environ)
    mine = select_shard(items, shard)
    outdir = prepare_out_dir(args.out)
    filters = generator_filters(args, choice.name)
    spec = GeneratorSpec(
        model=choice.name,
        checkpoint=choice.checkpoint,
        device=args.device,
        points_per_side=args.points_per_side,
        pred_iou_thresh=filters.pred_iou_thresh,
        stability_score_thresh=filters.stability_score_thresh,
        crop_n_layers=args.crop_n_layers,
        min_mask_region_area=args.min_mask_region_area,
        bf16=args.bf16,
    )
    desc = "everything" if shard[1] == 1 else f"everything {shard[0]}/{shard[1]}"
    if args.engine == "ray":
        from samkit.everything_ray import run_everything_ray

        summary = run_everything_ray(
            mine, outdir, spec, overlay=args.overlay, fail_fast=single,
            address=args.ray_address, actors=args.ray_actors,
        )
    else:
        summary = run_everything(mine, outdir, spec, overlay=args.overlay, fail_fast=single,
                                 desc=desc)
    print(f"{desc}: {summary} -> {outdir}")
    if summary.failed and under_torchrun(os.environ):
        print(
            "samkit: exit status 0 despite the failures above: under torchrun a non-zero exit "
            "stops every other rank. Rerun without torchrun for the overall status (done "
            "images are skipped).",
            file=sys.stderr,
        )
        return 0
    return summary.exit_code
