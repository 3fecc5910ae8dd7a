"""``samkit export-onnx``: the encoder and decoder graphs for onnxruntime (docs/onnx.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

from samkit.io import prepare_out_dir
from samkit.commands.arguments import add_model_arguments
from samkit.loading import resolve_model, warn_if_untrained


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``samkit export-onnx``."""
    parser = subparsers.add_parser(
        "export-onnx",
        help="export the encoder and decoder to ONNX (for onnxruntime)",
        description="Write encoder.onnx (resized uint8 image -> embedding), decoder.onnx "
        "(embedding + prompts -> masks at the original size), the faster shared-image decoder "
        "pair decoder_image.onnx (once per image) + decoder_prompts.onnx (per prompt) and "
        "samkit_onnx.json into DIR. See docs/onnx.md.",
    )
    add_model_arguments(parser, bf16=False, device_help=None)
    parser.add_argument("-o", "--out", type=Path, required=True, metavar="DIR",
                        help="output folder")
    # No argparse `choices`: a wrong value should be one SamkitError line, not a usage dump.
    parser.add_argument("--quantize", metavar="int8",
                        help="also write *.int8.onnx (dynamic int8 quantization)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``samkit export-onnx``: check everything cheap first, then export."""
    from samkit.build import build_sam, is_trained
    from samkit.onnx.export import check_quantize, export_onnx, require_packages

    check_quantize(args.quantize)
    require_packages(args.quantize is not None)
    choice = resolve_model(args.model, args.checkpoint)
    out_dir = prepare_out_dir(args.out)
    sam = build_sam(choice.name, choice.checkpoint)
    warn_if_untrained(f"model {choice.name!r}", is_trained(sam), what="the exported graphs")
    paths = export_onnx(sam, out_dir, model_name=choice.name, quantize=args.quantize)
    for path in paths.values():
        print(path)
    return 0
