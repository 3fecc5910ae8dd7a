"""``samkit segment``: masks for one image from point, box and text prompts.

Everything cheap is checked before anything slow: the prompt text, the model name and the
checkpoint come first, then the image (whose size the prompts must fit) and the output folder,
and only then is the model built and the image embedded. Every failure is one
:class:`SamkitError` line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from samkit.commands.arguments import add_model_arguments
from samkit.errors import SamkitError
from samkit.io import prepare_out_dir, write_bytes_atomic
from samkit.loading import (ModelChoice, build_model, resolve_device, resolve_model,
                            warn_if_untrained)
from samkit.prompts import (BOX_SYNTAX, POINT_SYNTAX, Prompts, check_prompts_fit, parse_prompts,
                            wants_multimask)

if TYPE_CHECKING:
    import torch

    from samkit.modeling.sam import Sam
    from samkit.predictor import TextEncoder

DEFAULT_OUT_ROOT = Path("samkit_out")


# --- command line -------------------------------------------------------------------------


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
    parser.add_argument("--text", metavar="PHRASE",
                        help="a text prompt, e.g. 'a wheel' (alone or with points / a box): "
                        "needs a model with a text slot and --clip (docs/text.md)")
    parser.add_argument("--clip", metavar="DIR",
                        help="CLIP weights for --text: a Hugging Face CLIP folder (e.g. from "
                        "`samkit weights fetch clip-vit-large-patch14-336`) or a state-dict file")
    add_model_arguments(parser, device_help="where to run the model (default: cuda if "
                        "available, else cpu)")
    parser.add_argument("--single", action="store_true",
                        help="always return one mask (no multimask output)")
    parser.add_argument("-o", "--out", type=Path, metavar="OUTDIR",
                        help=f"output folder (default {DEFAULT_OUT_ROOT}/<image stem>)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``samkit segment``: validate everything, predict, write, summarise."""
    import torch  # here, not at the top: `samkit --help` does not pay for it

    from samkit.build import weights_source
    from samkit.images import load_image

    text = check_text_arguments(args.text, args.clip)
    prompts = parse_prompts(args.point, args.box, text)
    choice = resolve_model(args.model, args.checkpoint)
    device = resolve_device(args.device)
    image = load_image(args.image)
    check_prompts_fit(prompts, height=image.shape[0], width=image.shape[1])
    multimask = wants_multimask(prompts, single=args.single)
    # Only now that the inputs are known good, so a typo leaves no empty folder behind.
    out_dir = prepare_out_dir(args.out or DEFAULT_OUT_ROOT / Path(args.image).stem)

    model, trained = build_model(choice, device)
    clip = None
    if text is not None:
        if model.text_prompt is None:
            raise SamkitError(f"--text needs a model with a text slot, and model "
                              f"{choice.name!r} ({weights_source(model)}) has none: pass "
                              "--checkpoint of a model trained with text_clip (docs/text.md)")
        from samkit.clip import load_clip

        clip = load_clip(args.clip, device=device)
    warn_if_untrained(f"model {choice.name!r}", trained)
    masks, scores = predict(model, image, prompts, multimask,
                            torch.bfloat16 if args.bf16 else None, clip)
    result = describe_run(
        Path(args.image), image, choice, trained, prompts, multimask, masks, scores
    )
    result["text"] = text
    result["encoder_dtype"] = "bfloat16" if args.bf16 else "float32"
    write_outputs(out_dir, image, prompts, masks, result)
    print_summary(out_dir, result)
    return 0


# --- validation ---------------------------------------------------------------------------


def check_text_arguments(text: str | None, clip: str | None) -> str | None:
    """The ``--text`` phrase (None without one); a phrase without ``--clip`` is an error."""
    if text is None:
        if clip is not None:
            raise SamkitError("--clip is only used with --text")
        return None
    if not text.strip():
        raise SamkitError("--text needs a phrase, e.g. --text 'a wheel'")
    if clip is None:
        raise SamkitError("--text needs CLIP weights: pass --clip DIR (a Hugging Face CLIP "
                          "folder; `samkit weights fetch clip-vit-large-patch14-336`)")
    return text.strip()


# --- model --------------------------------------------------------------------------------


def predict(
    model: Sam, image: np.ndarray, prompts: Prompts, multimask: bool,
    encoder_dtype: torch.dtype | None = None, clip: TextEncoder | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Embed ``image`` (under autocast to ``encoder_dtype`` if given) and decode ``prompts``
    (their text embedded by ``clip``): ``masks C x H x W`` bool and ``scores C``."""
    from samkit.predictor import SamPredictor

    predictor = SamPredictor(model, encoder_dtype=encoder_dtype, clip=clip)
    predictor.set_image(image)
    has_points = len(prompts.points) > 0
    masks, scores, _ = predictor.predict(
        point_coords=prompts.points if has_points else None,
        point_labels=prompts.labels if has_points else None,
        box=prompts.box,
        multimask_output=multimask,
        text=prompts.text,
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
    from samkit.rle import area_and_bbox, to_coco_rle

    rle = to_coco_rle(mask)
    return {"index": index, "file": f"mask_{index}.png", "score": score, **area_and_bbox(rle),
            "segmentation": rle}


def write_outputs(
    out_dir: Path, image: np.ndarray, prompts: Prompts, masks: np.ndarray, result: dict[str, Any]
) -> None:
    """``mask_<i>.png`` per mask, ``mask.png`` (best), ``overlay.png`` and ``result.json``,
    each written atomically; the JSON goes last so its presence means the run finished."""
    from samkit.overlay import UNTRAINED_BANNER, draw_overlay, save_png

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
