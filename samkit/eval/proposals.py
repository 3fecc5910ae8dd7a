"""``eval proposals``: zero-shot object proposals, SAM §7.3 and App. D.3.

SAM's segment-everything mode with a 64 x 64 point grid on the whole image (no crops), no
predicted-IoU or stability filtering, box NMS at 0.9 instead of 0.7, and the masks ranked by
the mean of predicted IoU and stability score; the top 1000 are the proposals. Scores are
COCO's class-agnostic mask average recall (pycocotools ``COCOeval``, ``useCats=0``,
``maxDets=[10, 100, 1000]``, IoU 0.50:0.95) overall and for small / medium / large objects
(COCO's area ranges: < 32², 32²-96², > 96² pixels).

The NMS inside :class:`~samkit.automatic.AutomaticMaskGenerator` keeps, of two duplicates, the
one with the higher predicted IoU (as the official generator does); the final ranking uses the
mean score.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from samkit.eval.cocoeval import average_recalls, run_cocoeval
from samkit.eval.common import ErrorLog, MethodLoop
from samkit.eval.datasets import Dataset
from samkit.rle import to_coco_rle

MAX_DETS = (10, 100, 1000)
DEFAULT_POINTS_PER_SIDE = 64
NMS_THRESH = 0.9

# ``generate(image) -> records`` in the official SamAutomaticMaskGenerator format (at least
# ``segmentation``, ``predicted_iou`` and ``stability_score``).
MaskGenerator = Callable[[Any], list[dict[str, Any]]]


def generator_settings(points_per_side: int) -> dict[str, Any]:
    """The :class:`~samkit.automatic.AutomaticMaskGenerator` arguments of the protocol."""
    return {
        "points_per_side": points_per_side,
        "pred_iou_thresh": 0.0,
        "stability_score_thresh": 0.0,
        "box_nms_thresh": NMS_THRESH,
        "crop_n_layers": 0,
        "output_mode": "coco_rle",
    }


def proposal_score(record: dict[str, Any]) -> float:
    """Mean of predicted IoU and stability (a NaN stability, from an empty mask, counts 0)."""
    values = [float(record.get("predicted_iou", 0.0)), float(record.get("stability_score", 0.0))]
    return sum(0.0 if math.isnan(v) else v for v in values) / 2


def image_proposals(records: list[dict[str, Any]], image_id: int) -> list[dict[str, Any]]:
    """The top ``max(MAX_DETS)`` records as COCO results (class-agnostic: category 1)."""
    ranked = sorted(records, key=proposal_score, reverse=True)[: max(MAX_DETS)]
    return [
        {"image_id": image_id, "category_id": 1, "segmentation": to_coco_rle(r["segmentation"]),
         "score": proposal_score(r)}
        for r in ranked
    ]


def run_proposals(
    datasets: list[Dataset], methods: list[tuple[str, MaskGenerator]], log: ErrorLog
) -> list[dict[str, Any]]:
    return [_run_dataset(ds, methods, log) for ds in datasets]


def _run_dataset(
    dataset: Dataset, methods: list[tuple[str, MaskGenerator]], log: ErrorLog
) -> dict[str, Any]:
    results: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in methods}
    image_ids: dict[str, list[int]] = {name: [] for name in results}
    loop = MethodLoop([(name, lambda sample, generate=generate: generate(sample.image))
                       for name, generate in methods])
    for sample, name, records in loop.run(dataset, log, desc=f"proposals {dataset.name}"):
        assert sample.image_id is not None
        results[name].extend(image_proposals(records, sample.image_id))
        image_ids[name].append(sample.image_id)
    methods_out = {}
    for name in results:
        evaluator = run_cocoeval(dataset.coco, results[name], image_ids[name], use_cats=False,
                                 max_dets=MAX_DETS)
        methods_out[name] = {
            "images": len(image_ids[name]),
            "proposals": len(results[name]),
            **average_recalls(evaluator, MAX_DETS),
            "seconds": round(loop.seconds[name], 3),
        }
    return {"images_evaluated": loop.images, "methods": methods_out}
