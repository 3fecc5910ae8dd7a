"""Options shared by several commands: which model to run, and the automatic mask
generator's settings (``samkit everything`` and ``samkit engine auto``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from samkit.registry import (DEFAULT_MODEL, MODEL_CONFIGS, PAPER_FILTERS, EverythingFilters,
                             get_config)

BF16_HELP = ("run the image encoder under bf16 autocast: about 4-5x the official fp32 speed "
             "on a CPU with native bf16 (AVX-512 BF16 / AMX); masks nearly equal fp32 "
             "(README, Speed)")


def add_model_arguments(parser: argparse.ArgumentParser, *, bf16: bool = True,
                        device_help: str | None = "default: cuda if available, else cpu") -> None:
    """``--model``, ``--checkpoint``, ``--device`` (unless ``device_help`` is None) and (with
    ``bf16``) ``--bf16``."""
    parser.add_argument("--model", default=DEFAULT_MODEL, metavar="NAME",
                        help=f"one of {', '.join(MODEL_CONFIGS)} (default {DEFAULT_MODEL})")
    parser.add_argument("--checkpoint", type=Path, metavar="PATH",
                        help="weights for --model (default: bundled, or the "
                        "`samkit weights fetch` cache)")
    if device_help is not None:
        parser.add_argument("--device", metavar="cpu|cuda", help=device_help)
    if bf16:
        parser.add_argument("--bf16", action="store_true", help=BF16_HELP)


def add_generator_arguments(parser: argparse.ArgumentParser) -> None:
    """The automatic mask generator's options (paper §7.3 defaults), shared by
    ``samkit everything`` and ``samkit engine auto``."""
    parser.add_argument("--points-per-side", type=int, default=32, metavar="N",
                        help="point grid is N x N per crop (default 32, the paper's)")
    parser.add_argument("--pred-iou-thresh", type=float, metavar="F",
                        help="drop masks with predicted IoU below F (default: the model's, "
                        "see docs/everything.md; 0.88 with --paper-filters)")
    parser.add_argument("--stability-score-thresh", type=float, metavar="F",
                        help="drop masks with stability score below F (default: the model's; "
                        "0.95 with --paper-filters)")
    parser.add_argument("--paper-filters", action="store_true",
                        help="the paper's filters (0.88 / 0.95, set for SAM's IoU head) instead "
                        "of the model's measured defaults")
    parser.add_argument("--crop-n-layers", type=int, default=0, metavar="N",
                        help="also run on N layers of zoomed-in crops (default 0)")
    parser.add_argument("--min-mask-region-area", type=int, default=0, metavar="N",
                        help="remove holes and islands smaller than N px (default 0: off)")


def generator_filters(args: argparse.Namespace, model: str) -> EverythingFilters:
    """The quality filters a run uses: each one given on the command line, else the
    paper's with ``--paper-filters``, else the registered model's."""
    base = PAPER_FILTERS if args.paper_filters else get_config(model).everything_filters
    return EverythingFilters(
        base.pred_iou_thresh if args.pred_iou_thresh is None else args.pred_iou_thresh,
        base.stability_score_thresh if args.stability_score_thresh is None
        else args.stability_score_thresh)
