"""``samkit train`` and ``python -m samkit.train``: a run from a YAML config (docs/training.md).

Only argparse at import: ``samkit --help`` imports this module, and training needs PyYAML.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from samkit.train.config import TrainConfig

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML run config (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config key (repeatable); values "
                        "are YAML, e.g. --set lr=1e-4 --set model_overrides.image_size=256")
    parser.add_argument("--data", action="append", metavar="SOURCE",
                        help="training data, replacing the config's (repeatable): a folder "
                        "with images/ + masks/, a folder of SA-1B JSONs, "
                        "coco:ANNOTATIONS.json:IMAGE_DIR or sa1b:JSON_DIR[:IMAGE_DIR]")
    parser.add_argument("--max-steps", type=int, metavar="N",
                        help="stop after N steps (the lr schedule still spans `iterations`)")
    parser.add_argument("--out-dir", metavar="DIR", help="where checkpoints and logs go")
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUT_DIR/checkpoint.pt if it exists")
    parser.add_argument("--build-feature-cache", action="store_true",
                        help="compute the frozen stem's features of every training image "
                        "into the config's feature_cache folder, then exit")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    try:
        from samkit.train.config import load_config
    except ModuleNotFoundError as err:
        from samkit.errors import SamkitError

        raise SamkitError(f"samkit train needs {err.name} (pip install pyyaml)") from None
    cfg = load_config(args.config, args.overrides)
    changes: dict[str, object] = {}
    if args.data:
        changes["data"] = list(args.data)
    if args.max_steps is not None:
        changes["max_steps"] = args.max_steps
    if args.out_dir:
        changes["out_dir"] = args.out_dir
    if args.resume:
        changes["resume"] = True
    return dataclasses.replace(cfg, **changes)


def run(args: argparse.Namespace) -> int:
    from samkit.train.loop import build_cache, train  # heavy imports only when training

    if args.build_feature_cache:
        folder = build_cache(config_from_args(args))
        print(f"samkit train: feature cache ready in {folder}")
        return 0
    rows = train(config_from_args(args))
    if rows:
        last = rows[-1]
        print(f"samkit train: step {int(last['step'])}: loss {last['loss']:.4f}, "
              f"mIoU {last['miou']:.3f}")
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``samkit train``."""
    parser = subparsers.add_parser(
        "train", help="train or fine-tune a SAM (paper App. A)",
        description="Train or fine-tune a SAM with the paper's algorithm (App. A: simulated "
        "interactive prompts, focal + dice + IoU losses) from a YAML config; resumes exactly "
        "with --resume. See docs/training.md.")
    add_arguments(parser)
    parser.set_defaults(func=run)
