"""``eval points``: interactive point (and box) prompts, SAM §7.1 and App. D.1.

Per object: click 1 at the object's centre (the point farthest from its boundary) with
multimask output; the mask with the highest predicted IoU is kept, and the best of the 3
candidates by true IoU is the "oracle" score. Each later click goes to the centre of the
deeper error region (:mod:`samkit.eval.clicks`), and the model gets all clicks so far plus the
previous kept mask's low-res logits, with a single mask output. IoUs are recorded after
1..``max_clicks`` clicks; an object stops once it has the clicks the curve needs (9) and has
reached 90 % IoU, or after ``max_clicks`` (20) clicks. NoC@t is the number of clicks to
reach IoU >= t, ``max_clicks`` when never reached. The box metric prompts each object with its
ground-truth box (single mask output).

Each image is embedded once; the objects of an image are prompted together: the boxes in
one batch, click 1 in one batch, and every later click round in one batch (all objects
still going have the same number of clicks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from samkit.errors import SamkitError
from samkit.eval.clicks import Click, first_click, mask_box, mask_iou, next_click
from samkit.eval.common import ErrorLog, MethodLoop
from samkit.data.masks import ObjectMask
from samkit.eval.datasets import Dataset, Sample
from samkit.eval.predictors import Prediction, PromptPredictor, PromptBatch

CURVE_CLICKS = (1, 2, 3, 5, 9)
NOC_THRESHOLDS = (0.85, 0.90)
DEFAULT_MAX_CLICKS = 20


@dataclass
class ObjectRun:
    """One object's interactive session."""

    target: ObjectMask
    clicks: list[Click] = field(default_factory=list)
    ious: list[float] = field(default_factory=list)  # after click 1, 2, ...
    oracle_iou: float = 0.0
    box_iou: float = 0.0
    mask: np.ndarray | None = None
    low_res: np.ndarray | None = None
    no_error_left: bool = False

    def iou_at(self, k: int) -> float:
        """IoU after ``k`` clicks; an object that ran out of errors keeps its last IoU."""
        return self.ious[min(k, len(self.ious)) - 1]

    def noc(self, threshold: float, max_clicks: int) -> int:
        reached = [k for k, iou in enumerate(self.ious, 1) if iou >= threshold]
        return reached[0] if reached else max_clicks

    def record(self, image: str) -> dict[str, Any]:
        return {
            "image": image,
            "object": self.target.label,
            "ious": [round(v, 5) for v in self.ious],
            "oracle_iou_1": round(self.oracle_iou, 5),
            "box_iou": round(self.box_iou, 5),
            "clicks": [[c.x, c.y, int(c.positive)] for c in self.clicks],
        }


class PointsEvaluator:
    """Runs the protocol for one method on one image at a time."""

    def __init__(self, predictor: PromptPredictor, max_clicks: int = DEFAULT_MAX_CLICKS) -> None:
        if max_clicks < 1:
            raise SamkitError(f"max_clicks must be >= 1, got {max_clicks}")
        self.predictor = predictor
        self.max_clicks = max_clicks
        self.curve_clicks = min(max(CURVE_CLICKS), max_clicks)

    def evaluate(self, sample: Sample) -> list[ObjectRun]:
        runs = [ObjectRun(obj) for obj in sample.objects]
        if not runs:
            return []
        self.predictor.set_image(sample.image)
        self._box_round(runs)
        self._first_round(runs)
        while active := [run for run in runs if self._wants_click(run)]:
            self._click_round(active)
        return runs

    def _wants_click(self, run: ObjectRun) -> bool:
        done = len(run.ious)
        if run.no_error_left or done >= self.max_clicks:
            return False
        return done < self.curve_clicks or run.ious[-1] < max(NOC_THRESHOLDS)

    def _box_round(self, runs: list[ObjectRun]) -> None:
        boxes = np.stack([mask_box(run.target.mask) for run in runs])
        pred = self.predictor.predict(PromptBatch(boxes=boxes), multimask=False)
        for run, masks in zip(runs, pred.masks, strict=True):
            run.box_iou = mask_iou(masks[0], run.target.mask, run.target.ignore)

    def _first_round(self, runs: list[ObjectRun]) -> None:
        for run in runs:
            click = first_click(run.target.mask, run.target.ignore)
            assert click is not None  # datasets never yield objects without pixels
            run.clicks.append(click)
        pred = self.predictor.predict(_point_prompts(runs), multimask=True)
        for b, run in enumerate(runs):
            candidate_ious = [
                mask_iou(m, run.target.mask, run.target.ignore) for m in pred.masks[b]
            ]
            run.oracle_iou = max(candidate_ious)
            best = int(np.argmax(pred.scores[b]))
            self._keep(run, pred, b, best, candidate_ious[best])

    def _click_round(self, runs: list[ObjectRun]) -> None:
        going = []
        for run in runs:
            assert run.mask is not None
            clicked = _clicked_map(run.clicks, run.mask.shape)
            click = next_click(run.mask, run.target.mask, run.target.ignore, clicked)
            if click is None:
                run.no_error_left = True
            else:
                run.clicks.append(click)
                going.append(run)
        if not going:
            return
        prompts = _point_prompts(going)
        if all(run.low_res is not None for run in going):
            low_res = np.stack([run.low_res for run in going])[:, None]
            prompts = PromptBatch(prompts.points, prompts.labels, mask_input=low_res)
        pred = self.predictor.predict(prompts, multimask=False)
        for b, run in enumerate(going):
            self._keep(run, pred, b, 0, mask_iou(pred.masks[b, 0], run.target.mask,
                                                 run.target.ignore))

    @staticmethod
    def _keep(run: ObjectRun, pred: Prediction, b: int, m: int, iou: float) -> None:
        run.mask = pred.masks[b, m]
        run.low_res = None if pred.low_res is None else pred.low_res[b, m]
        run.ious.append(iou)


def _point_prompts(runs: list[ObjectRun]) -> PromptBatch:
    points = np.array([[[c.x, c.y] for c in run.clicks] for run in runs], dtype=np.float64)
    labels = np.array([[int(c.positive) for c in run.clicks] for run in runs], dtype=np.int64)
    return PromptBatch(points=points, labels=labels)


def _clicked_map(clicks: list[Click], shape: tuple[int, ...]) -> np.ndarray:
    clicked = np.zeros(shape, dtype=bool)
    for c in clicks:
        clicked[c.y, c.x] = True
    return clicked


# ---------------------------------------------------------------------------- metrics
def summarize(runs: list[ObjectRun], max_clicks: int) -> dict[str, Any]:
    """Dataset-level metrics of one method (means over objects)."""
    if not runs:
        return {"objects": 0}
    curve_clicks = min(max(CURVE_CLICKS), max_clicks)
    curve = [float(np.mean([r.iou_at(k) for r in runs])) for k in range(1, curve_clicks + 1)]
    return {
        "objects": len(runs),
        "miou": {str(k): curve[k - 1] for k in CURVE_CLICKS if k <= curve_clicks},
        "miou_curve": curve,
        "oracle_miou_1": float(np.mean([r.oracle_iou for r in runs])),
        "box_miou": float(np.mean([r.box_iou for r in runs])),
        "noc": {
            _pct(t): float(np.mean([r.noc(t, max_clicks) for r in runs]))
            for t in NOC_THRESHOLDS
        },
        "noc_not_reached": {
            _pct(t): sum(int(max(r.ious) < t) for r in runs) for t in NOC_THRESHOLDS
        },
    }


def _pct(threshold: float) -> str:
    return str(round(threshold * 100))


def run_points(
    datasets: list[Dataset],
    predictors: list[PromptPredictor],
    log: ErrorLog,
    max_clicks: int = DEFAULT_MAX_CLICKS,
) -> list[dict[str, Any]]:
    """Every method on every dataset; each image is loaded once for all methods."""
    evaluators = [PointsEvaluator(p, max_clicks) for p in predictors]
    return [_run_dataset(ds, evaluators, log, max_clicks) for ds in datasets]


def _run_dataset(
    dataset: Dataset, evaluators: list[PointsEvaluator], log: ErrorLog, max_clicks: int
) -> dict[str, Any]:
    runs: dict[str, list[ObjectRun]] = {ev.predictor.name: [] for ev in evaluators}
    records: dict[str, list[dict[str, Any]]] = {name: [] for name in runs}
    loop = MethodLoop([(ev.predictor.name, ev.evaluate) for ev in evaluators])
    for sample, name, image_runs in loop.run(dataset, log, desc=f"points {dataset.name}",
                                             keep=lambda sample: bool(sample.objects)):
        runs[name].extend(image_runs)
        records[name].extend(r.record(sample.name) for r in image_runs)
    seconds = loop.seconds
    methods = {}
    for name, method_runs in runs.items():
        metrics = summarize(method_runs, max_clicks)
        metrics["seconds"] = round(seconds[name], 3)
        metrics["objects_per_s"] = (
            round(len(method_runs) / seconds[name], 3) if seconds[name] > 0 else None
        )
        metrics["per_object"] = records[name]
        methods[name] = metrics
    return {"images_evaluated": loop.images, "methods": methods}
