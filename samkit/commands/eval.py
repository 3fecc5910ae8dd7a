"""``samkit eval <protocol>``: the command line of the evaluation protocols.

Exit status: 0 when at least one image was evaluated (bad items are reported one line each
and skipped), 1 when nothing could be evaluated (the JSON / Markdown are still written, with
the reasons), 2 for a usage error (unknown model, missing checkpoint, bad option).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from samkit.errors import SamkitError
from samkit.registry import DEFAULT_MODEL, MODEL_CONFIGS

EXIT_NOTHING_EVALUATED = 1
PAPER = {
    "points": "SAM §7.1, App. D.1",
    "edges": "SAM §7.2, App. D.2",
    "proposals": "SAM §7.3, App. D.3",
    "instances": "SAM §7.4",
    "text": "SAM §7.5, App. D.5",
}
BASELINES = {"points": ("grabcut",), "edges": ("sobel", "canny")}
DATA_KINDS = {"points": ("masks", "coco"), "edges": ("bsds",), "proposals": ("coco",),
              "instances": ("coco",), "text": ("coco",)}


# ---------------------------------------------------------------------------- parser
def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``samkit eval {points,edges,proposals,instances,text}``."""
    parser = subparsers.add_parser(
        "eval",
        help="benchmark a model with the SAM paper's zero-shot protocols",
        description="Evaluate a model (and baselines) with the SAM paper's protocols; writes "
        "OUT.json, OUT.md and OUT.<dataset>.png. See docs/eval.md.",
    )
    protocols = parser.add_subparsers(dest="protocol", metavar="PROTOCOL", required=True)
    points = _protocol_parser(protocols, "points", "interactive clicks and box prompts: mIoU "
                              "at 1/2/3/5/9 clicks, NoC@85/90, box mIoU")
    points.add_argument("--max-clicks", type=int, default=20, metavar="N",
                        help="click budget; NoC is capped at N (default 20)")
    points.add_argument("--bf16", action="store_true",
                        help="also evaluate the model with its image encoder under bf16 "
                        "autocast (the accuracy cost of the fast path)")
    points.add_argument("--onnx", type=Path, metavar="DIR",
                        help="also evaluate the graphs in this `samkit export-onnx` folder "
                        "(fp32, and int8 when exported)")
    edges = _protocol_parser(protocols, "edges", "BSDS500 edge detection: ODS, OIS, AP, R50")
    edges.add_argument("--points-per-side", type=int, default=16, metavar="N",
                       help="point grid (default 16: 768 masks)")
    edges.add_argument("--thresholds", type=int, default=99, metavar="N",
                       help="edge thresholds of the PR curve (default 99, the benchmark's)")
    proposals = _protocol_parser(protocols, "proposals",
                                 "object proposals: AR@10/100/1000 overall and by size")
    proposals.add_argument("--points-per-side", type=int, default=64, metavar="N",
                           help="point grid (default 64, the paper's; smaller is faster)")
    proposals.add_argument("--points-per-batch", type=int, default=64, metavar="N",
                           help="prompts decoded together (default 64)")
    instances = _protocol_parser(protocols, "instances",
                                 "instance segmentation from boxes: COCO mask AP")
    source = instances.add_mutually_exclusive_group(required=True)
    source.add_argument("--detections", type=Path, metavar="FILE",
                        help="detector boxes, a COCO results JSON")
    source.add_argument("--oracle-boxes", action="store_true",
                        help="prompt with the ground-truth boxes instead")
    instances.add_argument("--score", choices=("det_x_iou", "det"), default="det_x_iou",
                           help="mask score: detection score x predicted IoU (default) or "
                           "the detection score")
    text = _protocol_parser(protocols, "text", "text prompts: mIoU of 'a {class}' phrases "
                            "alone, with a click, and the click alone")
    text.add_argument("--clip", required=True, metavar="DIR",
                      help="the CLIP the model's text slot was trained with: a Hugging Face "
                      "CLIP folder or a state-dict file (docs/text.md)")
    text.add_argument("--template", default="a {}", metavar="TEXT",
                      help="phrase for a category name, with {} for the name (default 'a {}')")
    text.add_argument("--min-area", type=int, default=10_000, metavar="PX",
                      help="instances smaller than this take no part (default 10000 = 100^2, "
                      "the paper's area threshold for text training)")


def _protocol_parser(
    protocols: argparse._SubParsersAction, name: str, summary: str
) -> argparse.ArgumentParser:
    p = protocols.add_parser(name, help=summary, description=f"{summary} ({PAPER[name]}).")
    p.add_argument("--data", type=Path, action="append", required=True, metavar="DIR",
                   help="dataset folder (repeatable)")
    p.add_argument("--json", type=Path, required=True, metavar="OUT.json",
                   help="results file; OUT.md and OUT.<dataset>.png are written next to it")
    p.add_argument("--model", default=DEFAULT_MODEL, metavar="NAME",
                   help=f"one of {', '.join(MODEL_CONFIGS)} (default {DEFAULT_MODEL})")
    p.add_argument("--checkpoint", type=Path, metavar="PATH",
                   help="weights for --model (default: bundled, or the weights cache)")
    p.add_argument("--device", metavar="cpu|cuda", help="default: cuda if available")
    p.add_argument("--limit", type=int, metavar="N", help="only the first N images per dataset")
    p.add_argument("--seed", type=int, default=0,
                   help="torch seed (fixes random weights of an untrained model; default 0)")
    if name in BASELINES:
        p.add_argument("--baseline", action="append", default=[], choices=BASELINES[name],
                       help="also evaluate this baseline (repeatable)")
        p.add_argument("--no-model", action="store_true",
                       help="evaluate only the baselines")
    p.set_defaults(func=run)
    return p


# ---------------------------------------------------------------------------- run
def run(args: argparse.Namespace) -> int:
    """Validate, load, evaluate, write; see the module docstring for the exit status."""
    from samkit.eval.common import ErrorLog
    from samkit.eval.report import markdown, write_report
    from samkit.io import prepare_out_dir
    from samkit.loading import resolve_device, resolve_model

    start = time.perf_counter()
    _check_args(args)
    _check_dependencies(args.protocol)
    # Model name, checkpoint and device are checked before anything slow.
    choice = resolve_model(args.model, args.checkpoint) if _uses_model(args) else None
    device = resolve_device(args.device)
    prepare_out_dir(args.json.resolve().parent)
    log = ErrorLog()
    datasets, dataset_errors = _open_datasets(args)
    model, model_info = (
        _load_model(choice, device, args.seed) if datasets and choice else (None, None)
    )
    results = PROTOCOLS[args.protocol](args, datasets, model, model_info, log) if datasets else []
    document = {
        "protocol": args.protocol,
        "paper": PAPER[args.protocol],
        "command": command_line(args),
        "model": model_info,
        "baselines": getattr(args, "baseline", []),
        "settings": protocol_settings(args),
        "seed": args.seed,
        "limit": args.limit,
        "datasets": _dataset_entries(datasets, results, dataset_errors, log),
        "errors_total": len(log.entries) + len(dataset_errors),
        "runtime_s": round(time.perf_counter() - start, 3),
        "versions": _versions(),
    }
    paths = write_report(args.json, document)
    print(markdown(document))
    print("wrote " + ", ".join(str(p) for p in paths))
    evaluated = sum(ds.get("images_evaluated", 0) for ds in document["datasets"])
    if evaluated == 0:
        print("samkit eval: nothing could be evaluated (see the reasons above)", file=sys.stderr)
        return EXIT_NOTHING_EVALUATED
    return 0


def _check_args(args: argparse.Namespace) -> None:
    for option in ("limit", "max_clicks", "points_per_side", "thresholds", "points_per_batch"):
        value = getattr(args, option, None)
        if value is not None and value < 1:
            raise SamkitError(f"--{option.replace('_', '-')} must be >= 1, got {value}")
    if args.protocol == "text":
        from samkit.eval.text import phrase

        phrase(args.template, "x")  # a template without exactly one {} fails here
        if args.min_area < 0:
            raise SamkitError(f"--min-area must be >= 0, got {args.min_area}")
    if getattr(args, "no_model", False) and not args.baseline:
        raise SamkitError("--no-model needs at least one --baseline")
    if getattr(args, "detections", None) is not None and not args.detections.is_file():
        raise SamkitError(f"detections file not found: {args.detections}")
    onnx = getattr(args, "onnx", None)
    if onnx is not None and not (onnx / "decoder.onnx").is_file():
        raise SamkitError(f"no decoder.onnx in {onnx} (write one with samkit export-onnx)")


def _check_dependencies(protocol: str) -> None:
    """The optional packages (``samkit[eval]``) this protocol needs, checked before any work."""
    needed = ["matplotlib"] + (["scipy", "pyEdgeEval"] if protocol == "edges" else [])
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise SamkitError(
            f"`samkit eval {protocol}` needs {', '.join(missing)}: pip install 'samkit[eval]'"
        )


def _uses_model(args: argparse.Namespace) -> bool:
    return not getattr(args, "no_model", False)


def _open_datasets(args: argparse.Namespace) -> tuple[list[Any], dict[str, str]]:
    """The usable datasets, and a reason for each ``--data`` that is not."""
    from samkit.errors import one_line
    from samkit.eval.datasets import open_dataset, require_kind

    datasets, errors, names = [], {}, set()
    for path in args.data:
        try:
            dataset = open_dataset(path, args.limit)
            require_kind(dataset, DATA_KINDS[args.protocol], args.protocol)
        except SamkitError as err:
            errors[str(path)] = one_line(err)
            print(f"samkit eval: skipped dataset {path}: {one_line(err)}", file=sys.stderr)
            continue
        dataset.name = _unique(dataset.name, names)
        datasets.append(dataset)
    return datasets, errors


def _unique(name: str, taken: set[str]) -> str:
    candidate, n = name, 2
    while candidate in taken:
        candidate, n = f"{name}-{n}", n + 1
    taken.add(candidate)
    return candidate


def _load_model(choice: Any, device: str, seed: int) -> tuple[Any, dict[str, Any]]:
    """Build the model (seeded, so random weights are reproducible) and describe it."""
    import torch

    from samkit.build import weights_source
    from samkit.loading import build_model, warn_if_untrained

    torch.manual_seed(seed)
    model, trained = build_model(choice, device)
    warn_if_untrained(f"model {choice.name!r}", trained, what="results")
    info = {
        "name": choice.name,
        "checkpoint": None if choice.checkpoint is None else str(choice.checkpoint.resolve()),
        "trained": trained,
        "weights": weights_source(model),
        "device": device,
        "image_size": model.image_size,
    }
    return model, info


def _dataset_entries(
    datasets: list[Any], results: list[dict[str, Any]], dataset_errors: dict[str, str],
    log: Any,
) -> list[dict[str, Any]]:
    entries = [
        {"name": ds.name, "path": str(ds.path.resolve()), "kind": ds.kind,
         "items": len(ds.items), **result, "errors": log.for_dataset(ds.name)}
        for ds, result in zip(datasets, results, strict=True)
    ]
    entries += [{"name": Path(path).name, "path": path, "images_evaluated": 0, "error": reason,
                 "errors": []} for path, reason in dataset_errors.items()]
    return entries


# ---------------------------------------------------------------------------- protocols
def _points(
    args: argparse.Namespace, datasets: list[Any], model: Any, info: Any, log: Any
) -> list[dict[str, Any]]:
    import torch

    from samkit.eval.grabcut import GrabCutPredictor
    from samkit.eval.points import run_points
    from samkit.eval.predictors import SamPromptPredictor, onnx_predictors

    predictors: list[Any] = [] if model is None else [SamPromptPredictor(model, info["name"])]
    if model is not None and args.bf16:
        predictors.append(SamPromptPredictor(model, f"{info['name']} (bf16 encoder)",
                                             encoder_dtype=torch.bfloat16))
    if args.onnx is not None:
        predictors += onnx_predictors(args.onnx)
    if "grabcut" in args.baseline:
        predictors.append(GrabCutPredictor())
    return run_points(datasets, predictors, log, args.max_clicks)


def _edges(
    args: argparse.Namespace, datasets: list[Any], model: Any, info: Any, log: Any
) -> list[dict[str, Any]]:
    from samkit.eval.edges import BASELINES as EDGE_BASELINES
    from samkit.eval.edges import SamEdges, run_edges, thresholds
    from samkit.eval.predictors import SamPromptPredictor

    methods: list[Any] = []
    if model is not None:
        sam = SamEdges(SamPromptPredictor(model, info["name"]), args.points_per_side)
        methods.append((info["name"], sam))
    methods += [(name, EDGE_BASELINES[name]) for name in dict.fromkeys(args.baseline)]
    return run_edges(datasets, methods, log, thresholds(args.thresholds))


def _proposals(
    args: argparse.Namespace, datasets: list[Any], model: Any, info: Any, log: Any
) -> list[dict[str, Any]]:
    from samkit.automatic import AutomaticMaskGenerator
    from samkit.eval.proposals import generator_settings, run_proposals
    from samkit.registry import get_config

    settings = generator_settings(args.points_per_side)
    paper = AutomaticMaskGenerator(model, points_per_batch=args.points_per_batch, **settings)
    # Beside the paper's protocol (no quality filters), what `samkit everything` keeps with
    # the model's own filters: the same settings with them on, so the NMS sees what it does.
    filters = get_config(info["name"]).everything_filters
    filtered = AutomaticMaskGenerator(model, points_per_batch=args.points_per_batch,
                                      **{**settings, **dataclasses.asdict(filters)})
    name = (f"{info['name']}, everything filters (IoU > {filters.pred_iou_thresh:g}, "
            f"stability >= {filters.stability_score_thresh:g})")
    return run_proposals(datasets, [(info["name"], paper.generate), (name, filtered.generate)],
                         log)


def _instances(
    args: argparse.Namespace, datasets: list[Any], model: Any, info: Any, log: Any
) -> list[dict[str, Any]]:
    from samkit.eval.instances import run_instances
    from samkit.eval.predictors import SamPromptPredictor

    predictor = SamPromptPredictor(model, info["name"])
    return run_instances(datasets, [predictor], log, args.detections, args.score)


def _text(
    args: argparse.Namespace, datasets: list[Any], model: Any, info: Any, log: Any
) -> list[dict[str, Any]]:
    from samkit.clip import load_clip
    from samkit.eval.predictors import SamPromptPredictor
    from samkit.eval.text import run_text

    if model.text_prompt is None:
        raise SamkitError(f"model {info['name']!r} has no text slot: `samkit eval text` needs "
                          "a --checkpoint trained with text_clip (docs/text.md)")
    predictor = SamPromptPredictor(model, info["name"], clip=load_clip(args.clip,
                                                                       device=info["device"]))
    return run_text(datasets, [predictor], log, args.template, args.min_area)


PROTOCOLS: dict[str, Callable[..., list[dict[str, Any]]]] = {
    "points": _points, "edges": _edges, "proposals": _proposals, "instances": _instances,
    "text": _text,
}


# ---------------------------------------------------------------------------- records
def protocol_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The protocol's parameters, as run (recorded in the JSON)."""
    if args.protocol == "points":
        from samkit.eval.points import CURVE_CLICKS, NOC_THRESHOLDS

        return {"max_clicks": args.max_clicks, "miou_at_clicks": list(CURVE_CLICKS),
                "noc_thresholds": list(NOC_THRESHOLDS), "click_1": "multimask, top predicted IoU",
                "later_clicks": "single mask + previous low-res logits",
                "click_placement": "farthest from the boundary of the deeper error region",
                "box_prompt": "ground-truth box, single mask"}
    if args.protocol == "edges":
        from samkit.eval.edges import BOX_NMS_THRESH, MAX_DIST

        return {"points_per_side": args.points_per_side, "masks_per_point": 3,
                "box_nms_thresh": BOX_NMS_THRESH, "thresholds": args.thresholds,
                "max_dist": MAX_DIST, "edge_nms": "edgesNms r=1 s=5 m=1.01", "thinning": True}
    if args.protocol == "proposals":
        from samkit.eval.proposals import MAX_DETS, generator_settings

        return {**generator_settings(args.points_per_side),
                "points_per_batch": args.points_per_batch,
                "ranking": "mean(predicted_iou, stability_score)", "max_dets": list(MAX_DETS),
                "use_cats": False}
    if args.protocol == "text":
        return {"template": args.template, "min_area": args.min_area,
                "text": "phrase alone, multimask, top predicted IoU; IoU with the best-matching "
                        "instance of the category",
                "text_point": "phrase + a click at each instance's centre, multimask, top "
                              "predicted IoU",
                "point": "the same click alone"}
    from samkit.eval.instances import MAX_PER_IMAGE

    return {"boxes": "ground truth" if args.oracle_boxes else str(args.detections.resolve()),
            "score": args.score, "refinement_passes": 1, "max_boxes_per_image": MAX_PER_IMAGE}


def command_line(args: argparse.Namespace) -> str:
    """The command, rebuilt from the parsed options (so it is exact whatever the caller)."""
    parts = ["samkit", "eval", args.protocol]
    skip = {"func", "command", "protocol"}
    if not _uses_model(args):
        skip |= {"model", "checkpoint"}
    for key, value in vars(args).items():
        if key in skip or value is None or value is False or value == []:
            continue
        flag = "--" + key.replace("_", "-")
        values = value if isinstance(value, list) else [value]
        for v in values:
            parts += [flag] if v is True else [flag, str(v)]
    return " ".join(parts)


def _versions() -> dict[str, str]:
    import numpy
    import torch

    import samkit

    return {"samkit": samkit.__version__, "torch": torch.__version__,
            "numpy": numpy.__version__, "python": platform.python_version()}
