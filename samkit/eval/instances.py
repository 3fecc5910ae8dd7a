"""``eval instances``: zero-shot instance segmentation from boxes, SAM §7.4.

A detector's boxes (a COCO results JSON, ``--detections``; the paper uses ViTDet-H) or the
ground-truth boxes (``--oracle-boxes``, an upper bound on what the boxes allow) prompt the
model, one box each with a single mask output; then one refinement pass feeds that mask's
low-res logits back together with the same box. Masks are scored with COCO mask AP
(pycocotools ``COCOeval``, ``iouType="segm"``, per category).

Each mask's score is, by default, the detection score times the model's predicted IoU for the
final mask (``--score det_x_iou``): it keeps the detector's ranking across objects and demotes
masks the model itself doubts; ``--score det`` keeps the detection score unchanged. Ground-truth
boxes have detection score 1, so with them only the predicted IoU ranks masks. Only the 100
highest-scoring detections of an image are prompted: COCO AP counts no more (``maxDets`` 100).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from samkit.errors import SamkitError
from samkit.eval.cocoeval import (
    average_precisions,
    precision_recall_curve,
    run_cocoeval,
)
from samkit.eval.common import ErrorLog, MethodLoop
from samkit.eval.datasets import Dataset, Sample
from samkit.eval.predictors import PromptPredictor, PromptBatch
from samkit.rle import to_coco_rle

SCORE_MODES = ("det_x_iou", "det")
MAX_PER_IMAGE = 100
BOXES_PER_BATCH = 32


@dataclass(frozen=True)
class Detection:
    image_id: int
    category_id: int
    box: np.ndarray  # XYXY
    score: float


# ---------------------------------------------------------------------------- detections
def load_detections(path: Path, log: ErrorLog) -> list[Detection]:
    """Parse a COCO results file (a list of ``{image_id, category_id, bbox: [x, y, w, h],
    score}``); each malformed entry is reported and skipped. An unreadable file, or one that
    is not a list, fails the run."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SamkitError(f"cannot read detections {path}: {err}") from None
    if not isinstance(data, list):
        raise SamkitError(f"detections {path} must be a JSON list of COCO results")
    detections = []
    for i, entry in enumerate(data):
        try:
            detections.append(parse_detection(entry))
        except SamkitError as err:
            log.add(path.name, f"entry {i}", str(err))
    return detections


def parse_detection(entry: Any) -> Detection:
    if not isinstance(entry, dict):
        raise SamkitError("not an object")
    missing = [k for k in ("image_id", "category_id", "bbox", "score") if k not in entry]
    if missing:
        raise SamkitError(f"missing {', '.join(missing)}")
    bbox, score = entry["bbox"], entry["score"]
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(map(_finite, bbox))):
        raise SamkitError(f"bbox must be 4 finite numbers [x, y, w, h], got {bbox!r}")
    if not _finite(score):
        raise SamkitError(f"score must be a finite number, got {score!r}")
    ids = (entry["image_id"], entry["category_id"])
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in ids):
        raise SamkitError(f"image_id and category_id must be integers, got {ids!r}")
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        raise SamkitError(f"bbox {bbox} has no area")
    return Detection(ids[0], ids[1], np.array([x, y, x + w, y + h]), float(score))


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def oracle_detections(coco: Any) -> list[Detection]:
    """One detection per non-crowd ground-truth object, with its box and score 1."""
    out = []
    for ann in coco.dataset["annotations"]:
        if ann.get("iscrowd", 0) or "bbox" not in ann:
            continue
        x, y, w, h = ann["bbox"]
        if w > 0 and h > 0:
            out.append(Detection(ann["image_id"], ann["category_id"],
                                 np.array([x, y, x + w, y + h], float), 1.0))
    return out


# ---------------------------------------------------------------------------- masks
def segment_detections(
    predictor: PromptPredictor, sample: Sample, detections: list[Detection], score_mode: str
) -> list[dict[str, Any]]:
    """COCO mask results for one image's detections."""
    assert sample.image_id is not None
    chosen = sorted(detections, key=lambda d: d.score, reverse=True)[:MAX_PER_IMAGE]
    if not chosen:
        return []
    predictor.set_image(sample.image)
    h, w = sample.image.shape[:2]
    results = []
    for start in range(0, len(chosen), BOXES_PER_BATCH):
        batch = chosen[start : start + BOXES_PER_BATCH]
        boxes = np.stack([_clip(d.box, w, h) for d in batch])
        first = predictor.predict(PromptBatch(boxes=boxes), multimask=False)
        prompts = PromptBatch(boxes=boxes)
        if first.low_res is not None:
            prompts = PromptBatch(boxes=boxes, mask_input=first.low_res[:, :1])
        final = predictor.predict(prompts, multimask=False)
        for d, mask, iou in zip(batch, final.masks[:, 0], final.scores[:, 0], strict=True):
            score = d.score * float(iou) if score_mode == "det_x_iou" else d.score
            results.append({"image_id": sample.image_id, "category_id": d.category_id,
                            "segmentation": to_coco_rle(mask), "score": score})
    return results


def _clip(box: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.clip(box, 0, [width, height, width, height])


# ---------------------------------------------------------------------------- runner
def run_instances(
    datasets: list[Dataset],
    predictors: list[PromptPredictor],
    log: ErrorLog,
    detections_file: Path | None,
    score_mode: str,
) -> list[dict[str, Any]]:
    """Every method on every COCO dataset; detections come from ``detections_file`` or,
    without one, from the ground truth."""
    if score_mode not in SCORE_MODES:
        raise SamkitError(f"score mode must be one of {', '.join(SCORE_MODES)}")
    shared = None if detections_file is None else load_detections(detections_file, log)
    if shared is not None and not shared:
        raise SamkitError(f"no usable detections in {detections_file}")
    return [
        _run_dataset(ds, predictors, log, shared if shared is not None
                     else oracle_detections(ds.coco), score_mode)
        for ds in datasets
    ]


def _run_dataset(
    dataset: Dataset, predictors: list[PromptPredictor], log: ErrorLog,
    detections: list[Detection], score_mode: str,
) -> dict[str, Any]:
    by_image: dict[int, list[Detection]] = defaultdict(list)
    for d in detections:
        by_image[d.image_id].append(d)
    results: dict[str, list[dict[str, Any]]] = {p.name: [] for p in predictors}
    image_ids: dict[str, list[int]] = {p.name: [] for p in predictors}

    def segmenter(predictor: PromptPredictor) -> Callable[[Sample], list[dict[str, Any]]]:
        def segment(sample: Sample) -> list[dict[str, Any]]:
            assert sample.image_id is not None
            return segment_detections(predictor, sample, by_image[sample.image_id], score_mode)
        return segment

    loop = MethodLoop([(p.name, segmenter(p)) for p in predictors])
    for sample, name, masks in loop.run(dataset, log, desc=f"instances {dataset.name}"):
        results[name].extend(masks)
        image_ids[name].append(sample.image_id)
    methods = {}
    for name in results:
        evaluator = run_cocoeval(dataset.coco, results[name], image_ids[name], use_cats=True)
        methods[name] = {
            "images": len(image_ids[name]),
            "masks": len(results[name]),
            **average_precisions(evaluator),
            "pr_curve": precision_recall_curve(evaluator),
            "seconds": round(loop.seconds[name], 3),
        }
    known = set(dataset.coco.imgs)
    return {
        "images_evaluated": loop.images,
        "detections": sum(len(v) for k, v in by_image.items() if k in known),
        "detections_for_unknown_images": sum(len(v) for k, v in by_image.items()
                                             if k not in known),
        "methods": methods,
    }
