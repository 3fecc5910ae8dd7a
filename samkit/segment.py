"""``samkit segment``: masks for one image from point and box prompts.

Everything cheap is checked before anything slow: the prompt text, the model name and the
checkpoint come first, then the image (whose size the prompts must fit) and the output folder,
and only then is the model built and the image embedded. Every failure is one
:class:`SamkitError` line.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils

from samkit.build import DEFAULT_MODEL, MODEL_CONFIGS, build_sam, get_config, is_trained
from samkit.errors import SamkitError
from samkit.images import load_image
from samkit.modeling.sam import Sam
from samkit.overlay import UNTRAINED_BANNER, draw_overlay, save_png, write_bytes_atomic
from samkit.predictor import SamPredictor
from samkit.weights import REGISTRY, cached_path

DEFAULT_OUT_ROOT = Path("samkit_out")
POINT_SYNTAX = "x,y[,label]"
BOX_SYNTAX = "x0,y0,x1,y1"


@dataclass(frozen=True)
class Prompts:
    """Prompts in original-image pixels: ``points K x 2`` XY with ``labels K`` (1 foreground,
    0 background), and at most one XYXY ``box``."""

    points: np.ndarray
    labels: np.ndarray
    box: np.ndarray | None

    def to_json(self) -> dict[str, Any]:
        return {
            "points": self.points.tolist(),
            "labels": self.labels.tolist(),
            "box": None if self.box is None else self.box.tolist(),
        }


@dataclass(frozen=True)
class ModelChoice:
    """Which model to build and from which weights (``None``: bundled weights or random)."""

    name: str
    checkpoint: Path | None


# --- command line -------------------------------------------------------------------------


BF16_HELP = ("run the image encoder under bf16 autocast: about 4-5x the official fp32 speed "
             "on a CPU with native bf16 (AVX-512 BF16 / AMX); masks nearly equal fp32 "
             "(README, Speed)")


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``samkit segment``."""
    parser = subparsers.add_parser(
        "segment",
        help="segment one image from point / box prompts",
        description="Predict masks for IMAGE from point and box prompts (pixel coordinates). "
        "By default a single point, or a single box without points, returns 3 candidate "
        "masks (the prompt is ambiguous); other prompts return one.",
    )
    # Prompt text is parsed by this module, not argparse `type=`, so malformed text is one
    # error line like every other failure rather than a usage dump.
    parser.add_argument("image", metavar="IMAGE", help="image file (JPEG, PNG, ...)")
    parser.add_argument(
        "--point", action="append", default=[], metavar=POINT_SYNTAX,
        help="a point prompt; label 1 = foreground (default), 0 = background; repeatable",
    )
    parser.add_argument("--box", action="append", default=[], metavar=BOX_SYNTAX,
                        help="a box prompt (corners, x1 > x0 and y1 > y0)")
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, metavar="NAME",
        help=f"one of {', '.join(MODEL_CONFIGS)} (default {DEFAULT_MODEL})",
    )
    parser.add_argument(
        "--checkpoint", type=Path, metavar="PATH",
        help="weights for --model (default: bundled, or the `samkit weights fetch` cache)",
    )
    parser.add_argument("--single", action="store_true",
                        help="always return one mask (no multimask output)")
    parser.add_argument("-o", "--out", type=Path, metavar="OUTDIR",
                        help=f"output folder (default {DEFAULT_OUT_ROOT}/<image stem>)")
    parser.add_argument("--bf16", action="store_true", help=BF16_HELP)
    parser.add_argument("--device", metavar="cpu|cuda",
                        help="where to run the model (default: cuda if available, else cpu)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``samkit segment``: validate everything, predict, write, summarise."""
    prompts = parse_prompts(args.point, args.box)
    choice = resolve_model(args.model, args.checkpoint)
    device = resolve_device(args.device)
    image = load_image(args.image)
    check_prompts_fit(prompts, height=image.shape[0], width=image.shape[1])
    multimask = wants_multimask(prompts, single=args.single)
    # Only now that the inputs are known good, so a typo leaves no empty folder behind.
    out_dir = prepare_out_dir(args.out or DEFAULT_OUT_ROOT / Path(args.image).stem)

    model, trained = build_model(choice, device)
    if not trained:
        print(
            f"WARNING: model {choice.name!r} has no trained weights in this install: masks are "
            "from RANDOM weights and mean nothing",
            file=sys.stderr,
        )
    masks, scores = predict(model, image, prompts, multimask,
                            torch.bfloat16 if args.bf16 else None)
    result = describe_run(
        Path(args.image), image, choice, trained, prompts, multimask, masks, scores
    )
    result["encoder_dtype"] = "bfloat16" if args.bf16 else "float32"
    write_outputs(out_dir, image, prompts, masks, result)
    print_summary(out_dir, result)
    return 0


# --- validation ---------------------------------------------------------------------------


def parse_prompts(point_texts: list[str], box_texts: list[str]) -> Prompts:
    """Turn ``--point`` / ``--box`` strings into a :class:`Prompts`; at least one is needed."""
    if not point_texts and not box_texts:
        raise SamkitError(
            f"no prompt given: pass --point {POINT_SYNTAX} (repeatable) and/or --box {BOX_SYNTAX}"
        )
    if len(box_texts) > 1:
        raise SamkitError("only one --box per run (SAM takes a single box per prompt)")
    parsed = [parse_point(text) for text in point_texts]
    points = np.array([p[:2] for p in parsed], dtype=np.float64).reshape(-1, 2)
    labels = np.array([p[2] for p in parsed], dtype=np.int64)
    box = parse_box(box_texts[0]) if box_texts else None
    return Prompts(points, labels, box)


def parse_point(text: str) -> tuple[float, float, int]:
    """``"x,y"`` or ``"x,y,label"`` -> ``(x, y, label)``; the label defaults to 1."""
    parts = text.split(",")
    if len(parts) not in (2, 3):
        raise SamkitError(f"bad --point {text!r}: expected {POINT_SYNTAX}, e.g. 120,80 or 120,80,0")
    x, y = (_number(part, "--point", text) for part in parts[:2])
    label = 1
    if len(parts) == 3:
        if parts[2].strip() not in ("0", "1"):
            raise SamkitError(
                f"bad --point {text!r}: label must be 1 (foreground) or 0 (background)"
            )
        label = int(parts[2])
    return x, y, label


def parse_box(text: str) -> np.ndarray:
    """``"x0,y0,x1,y1"`` -> a length-4 float array with ``x1 > x0`` and ``y1 > y0``."""
    parts = text.split(",")
    if len(parts) != 4:
        raise SamkitError(f"bad --box {text!r}: expected {BOX_SYNTAX}, e.g. 10,20,200,180")
    x0, y0, x1, y1 = (_number(part, "--box", text) for part in parts)
    if x1 <= x0 or y1 <= y0:
        raise SamkitError(
            f"bad --box {text!r}: need x1 > x0 and y1 > y0 (top-left corner first)"
        )
    return np.array([x0, y0, x1, y1], dtype=np.float64)


def _number(part: str, option: str, text: str) -> float:
    try:
        value = float(part)
    except ValueError:
        raise SamkitError(f"bad {option} {text!r}: {part.strip()!r} is not a number") from None
    if not math.isfinite(value):
        raise SamkitError(f"bad {option} {text!r}: coordinates must be finite")
    return value


def check_prompts_fit(prompts: Prompts, *, height: int, width: int) -> None:
    """Points must lie on a pixel of the image and the box inside it (its edges may touch
    the border, hence ``<= width``)."""
    for (x, y), label in zip(prompts.points, prompts.labels, strict=True):
        if not (0 <= x < width and 0 <= y < height):
            raise SamkitError(
                f"point {_fmt(x)},{_fmt(y)},{label} is outside the {width}x{height} image "
                f"(x must be in 0..{width - 1}, y in 0..{height - 1})"
            )
    if prompts.box is not None:
        x0, y0, x1, y1 = prompts.box
        if not (0 <= x0 and 0 <= y0 and x1 <= width and y1 <= height):
            raise SamkitError(
                f"box {','.join(_fmt(v) for v in prompts.box)} is not inside the "
                f"{width}x{height} image"
            )


def _fmt(value: float) -> str:
    return f"{value:g}"


def wants_multimask(prompts: Prompts, *, single: bool) -> bool:
    """Multimask output for ambiguous prompts, as the paper recommends: one point alone, or one
    box without points. More prompts pin the object down, so one mask is better."""
    if single:
        return False
    if prompts.box is None:
        return len(prompts.points) == 1
    return len(prompts.points) == 0


def resolve_model(name: str, checkpoint: Path | None) -> ModelChoice:
    """Check the model name and find its weights, without loading anything."""
    get_config(name)  # raises on an unknown name, listing the valid ones
    if checkpoint is not None:
        if not checkpoint.is_file():
            raise SamkitError(f"checkpoint not found: {checkpoint}")
        return ModelChoice(name, checkpoint)
    if name in REGISTRY:
        cached = cached_path(name)
        # `samkit weights fetch` only ever moves a fully verified download to this name.
        if not cached.is_file():
            raise SamkitError(
                f"no weights for official model {name!r} in {cached.parent}; "
                f"run: samkit weights fetch {name}, or pass --checkpoint"
            )
        return ModelChoice(name, cached)
    return ModelChoice(name, None)


def resolve_device(name: str | None) -> str:
    """``cpu``, ``cuda`` or ``cuda:N``; ``None`` picks CUDA when it is available."""
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    match = re.fullmatch(r"cpu|cuda(?::(\d+))?", name)
    if match is None:
        raise SamkitError(f"unknown --device {name!r}; use cpu, cuda or cuda:N")
    if name == "cpu":
        return name
    if not torch.cuda.is_available():
        raise SamkitError(f"--device {name} requested but CUDA is not available here")
    if match.group(1) is not None and int(match.group(1)) >= torch.cuda.device_count():
        raise SamkitError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    return name


def prepare_out_dir(path: Path) -> Path:
    """Create the output folder and prove it is writable, before any slow work."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise SamkitError(f"cannot write to output folder {path}: {err.strerror or err}") from None
    return path


# --- model --------------------------------------------------------------------------------


def build_model(choice: ModelChoice, device: str) -> tuple[Sam, bool]:
    """Build the model on ``device``; returns it and whether its weights are trained."""
    model = build_sam(choice.name, choice.checkpoint, device=device)
    return model, is_trained(model)


def predict(
    model: Sam, image: np.ndarray, prompts: Prompts, multimask: bool,
    encoder_dtype: torch.dtype | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Embed ``image`` (under autocast to ``encoder_dtype`` if given) and decode ``prompts``:
    ``masks C x H x W`` bool and ``scores C``."""
    predictor = SamPredictor(model, encoder_dtype=encoder_dtype)
    predictor.set_image(image)
    has_points = len(prompts.points) > 0
    masks, scores, _ = predictor.predict(
        point_coords=prompts.points if has_points else None,
        point_labels=prompts.labels if has_points else None,
        box=prompts.box,
        multimask_output=multimask,
    )
    return masks, scores


# --- outputs ------------------------------------------------------------------------------


def describe_run(
    image_path: Path,
    image: np.ndarray,
    choice: ModelChoice,
    trained: bool,
    prompts: Prompts,
    multimask: bool,
    masks: np.ndarray,
    scores: np.ndarray,
) -> dict[str, Any]:
    """Everything ``result.json`` records about one run."""
    return {
        "image": {
            "path": str(image_path.resolve()),
            "width": int(image.shape[1]),
            "height": int(image.shape[0]),
        },
        "model": choice.name,
        "checkpoint": None if choice.checkpoint is None else str(choice.checkpoint.resolve()),
        "trained": trained,
        "prompts": prompts.to_json(),
        "multimask": multimask,
        "best_index": int(np.argmax(scores)),
        "masks": [
            mask_record(i, mask, float(score))
            for i, (mask, score) in enumerate(zip(masks, scores, strict=True))
        ],
    }


def mask_record(index: int, mask: np.ndarray, score: float) -> dict[str, Any]:
    """Index, score, area, XYWH bbox and COCO RLE (``counts`` as str, so it is valid JSON)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {
        "index": index,
        "file": f"mask_{index}.png",
        "score": score,
        "area": int(mask_utils.area(rle)),
        "bbox": [int(v) for v in mask_utils.toBbox(rle)],
        "segmentation": {
            "size": [int(v) for v in rle["size"]],
            "counts": rle["counts"].decode("ascii"),
        },
    }


def write_outputs(
    out_dir: Path, image: np.ndarray, prompts: Prompts, masks: np.ndarray, result: dict[str, Any]
) -> None:
    """``mask_<i>.png`` per mask, ``mask.png`` (best), ``overlay.png`` and ``result.json``,
    each written atomically; the JSON goes last so its presence means the run finished."""
    for i, mask in enumerate(masks):
        save_png(out_dir / f"mask_{i}.png", mask)
    best = masks[result["best_index"]]
    save_png(out_dir / "mask.png", best)
    overlay = draw_overlay(
        image,
        best[None],
        points=prompts.points,
        labels=prompts.labels,
        boxes=None if prompts.box is None else prompts.box[None],
        banner=None if result["trained"] else UNTRAINED_BANNER,
    )
    save_png(out_dir / "overlay.png", overlay)
    write_bytes_atomic(out_dir / "result.json", (json.dumps(result, indent=2) + "\n").encode())


def print_summary(out_dir: Path, result: dict[str, Any]) -> None:
    """A few lines on stdout: what was segmented and where the files are."""
    best = result["masks"][result["best_index"]]
    image = result["image"]
    weights = "trained" if result["trained"] else "UNTRAINED, random weights"
    print(
        f"segmented {image['path']} ({image['width']}x{image['height']}) with "
        f"{result['model']} ({weights}): {len(result['masks'])} mask(s), best #{best['index']} "
        f"score {best['score']:.3f}, area {best['area']} px"
    )
    for name in ("mask.png", "overlay.png", "result.json"):
        print(f"  {out_dir / name}")
