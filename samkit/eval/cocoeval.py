"""pycocotools' COCOeval, quiet, and the numbers the protocols report from it."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from typing import Any

import numpy as np

AREA_NAMES = ("all", "small", "medium", "large")  # COCOeval's areaRng order


def run_cocoeval(
    coco_gt: Any,
    results: list[dict[str, Any]],
    image_ids: Sequence[int],
    use_cats: bool,
    max_dets: Sequence[int] | None = None,
) -> Any:
    """Evaluated and accumulated segm COCOeval over ``image_ids``, or ``None`` when there is
    nothing to score (no results: every metric is then 0)."""
    from pycocotools.cocoeval import COCOeval

    if not results or not image_ids:
        return None
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="segm")
        evaluator.params.imgIds = sorted(image_ids)
        evaluator.params.useCats = int(use_cats)
        if max_dets is not None:
            evaluator.params.maxDets = list(max_dets)
        evaluator.evaluate()
        evaluator.accumulate()
    return evaluator


def mean_valid(values: np.ndarray) -> float | None:
    """Mean of the entries COCOeval filled in (it marks "no ground truth" with -1)."""
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else None


def average_recalls(evaluator: Any, max_dets: Sequence[int]) -> dict[str, float | None]:
    """AR (mean recall over IoU 0.50:0.95) for every max-detections x area range, keyed
    like ``"AR@100"`` and ``"AR_small@100"``."""
    out: dict[str, float | None] = {}
    for m, dets in enumerate(max_dets):
        for a, area in enumerate(AREA_NAMES):
            key = f"AR@{dets}" if area == "all" else f"AR_{area}@{dets}"
            out[key] = 0.0 if evaluator is None else mean_valid(
                evaluator.eval["recall"][:, :, a, m]
            )
    return out


def average_precisions(evaluator: Any) -> dict[str, float | None]:
    """COCO's AP, AP50, AP75, AP_small, AP_medium, AP_large (maxDets 100)."""
    keys = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large")
    if evaluator is None:
        return dict.fromkeys(keys, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.summarize()
    stats = evaluator.stats[:6]
    return {k: (float(v) if v > -1 else None) for k, v in zip(keys, stats, strict=True)}


def precision_recall_curve(evaluator: Any) -> dict[str, list[float]]:
    """Precision at COCO's 101 recall points, averaged over IoU thresholds and categories
    (all areas, the last maxDets)."""
    recall = np.linspace(0, 1, 101)
    if evaluator is None:
        return {"recall": recall.tolist(), "precision": [0.0] * len(recall)}
    precision = evaluator.eval["precision"][:, :, :, 0, -1]  # T x R x K
    curve = [mean_valid(precision[:, r, :]) or 0.0 for r in range(len(recall))]
    return {"recall": recall.tolist(), "precision": curve}
