"""``eval text``: text prompts (SAM §7.5, App. D.5), made quantitative.

The paper shows text-to-mask only qualitatively (its Fig. 12). Here, on a COCO-style
instances dataset, every category present in an image is prompted with a phrase made from its
name (``"a {}"`` by default, so "a dog"), and three ways of asking are scored:

* **text**: the phrase alone, three outputs, the top-ranked mask; its IoU with the
  best-matching instance of that category (any instance of a named category is a right
  answer);
* **text + point**: per instance, the phrase plus one positive click at the instance's centre
  (the point farthest from its boundary, as the first click of ``eval points``); the top mask's
  IoU with that instance;
* **point**: the same click without the phrase, so the table shows what the text adds.

Only instances of at least ``min_area`` pixels take part (default 100² px, the paper's area
threshold for text training, App. D.5); a category with no such instance in an image is not
prompted there. Crowd regions are never instances.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

from samkit.errors import SamkitError
from samkit.eval.clicks import first_click, mask_iou
from samkit.eval.common import ErrorLog, MethodLoop
from samkit.eval.datasets import Dataset, Sample
from samkit.eval.predictors import PromptBatch, PromptPredictor

DEFAULT_TEMPLATE = "a {}"
DEFAULT_MIN_AREA = 100 * 100
PROMPTS_PER_BATCH = 32
KINDS = ("text", "text_point", "point")


@dataclass(frozen=True)
class Instance:
    mask: np.ndarray  # H x W bool
    category: str
    label: str  # e.g. "annotation 17"


def phrase(template: str, category: str) -> str:
    """The prompt for a category name; ``template`` must hold exactly one ``{}``."""
    if template.count("{}") != 1:
        raise SamkitError(f"--template must contain {{}} exactly once, got {template!r}")
    return template.format(category)


def sample_instances(sample: Sample, categories: dict[int, str], min_area: int
                     ) -> list[Instance]:
    """The sample's instances that take part: a known category and at least ``min_area``
    pixels."""
    return [Instance(o.mask, categories[o.category_id], o.label) for o in sample.objects
            if o.category_id in categories and np.count_nonzero(o.mask) >= min_area]


def centre(mask: np.ndarray) -> tuple[int, int]:
    """XY of the pixel of a non-empty mask farthest from its boundary (``eval points``'
    first click)."""
    click = first_click(mask)
    if click is None:
        raise SamkitError("an instance has an empty mask")
    return click.x, click.y


class TextEvaluator:
    """The three kinds of prompt for every instance / category of one image."""

    def __init__(self, predictor: PromptPredictor, categories: dict[int, str], template: str,
                 min_area: int) -> None:
        self.predictor = predictor
        self.categories = categories
        self.template = template
        self.min_area = min_area

    def evaluate(self, sample: Sample) -> list[dict[str, Any]]:
        """One record per prompt: ``kind``, ``category``, ``phrase``, ``iou`` (and the
        instance for the per-instance kinds)."""
        instances = sample_instances(sample, self.categories, self.min_area)
        if not instances:
            return []
        self.predictor.set_image(sample.image)
        by_category: dict[str, list[Instance]] = defaultdict(list)
        for inst in instances:
            by_category[inst.category].append(inst)
        names = sorted(by_category)
        phrases = [phrase(self.template, name) for name in names]
        records = []
        for name, text, mask in zip(names, phrases, self._top_masks(PromptBatch(
                texts=tuple(phrases))), strict=True):
            best = max(mask_iou(mask, inst.mask, None) for inst in by_category[name])
            records.append({"kind": "text", "category": name, "phrase": text, "iou": best})
        points = np.array([[centre(inst.mask)] for inst in instances], dtype=np.float64)
        labels = np.ones(points.shape[:2], dtype=np.int64)
        texts = tuple(phrase(self.template, inst.category) for inst in instances)
        asked = {
            "text_point": PromptBatch(points=points, labels=labels, texts=texts),
            "point": PromptBatch(points=points, labels=labels),
        }
        for kind, prompts in asked.items():
            for inst, text, mask in zip(instances, texts, self._top_masks(prompts), strict=True):
                records.append({"kind": kind, "category": inst.category, "phrase": text,
                                "instance": inst.label, "iou": mask_iou(mask, inst.mask, None)})
        return records

    def _top_masks(self, prompts: PromptBatch) -> list[np.ndarray]:
        """The top-ranked of the three masks for each prompt set, decoded in chunks."""
        out: list[np.ndarray] = []
        for start in range(0, len(prompts), PROMPTS_PER_BATCH):
            chunk = PromptBatch(**{
                key: None if value is None else value[start : start + PROMPTS_PER_BATCH]
                for key, value in vars(prompts).items()
            })
            pred = self.predictor.predict(chunk, multimask=True)
            top = pred.scores.argmax(axis=1)
            out.extend(pred.masks[np.arange(len(top)), top])
        return out


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """mIoU and count per kind of prompt, and the text-only mIoU per category."""
    metrics: dict[str, Any] = {}
    for kind in KINDS:
        ious = [r["iou"] for r in records if r["kind"] == kind]
        metrics[f"{kind}_prompts"] = len(ious)
        metrics[f"{kind}_miou"] = float(np.mean(ious)) if ious else None
    per_category: dict[str, list[float]] = defaultdict(list)
    for r in records:
        if r["kind"] == "text":
            per_category[r["category"]].append(r["iou"])
    metrics["text_miou_per_category"] = {name: float(np.mean(v))
                                         for name, v in sorted(per_category.items())}
    return metrics


def run_text(datasets: list[Dataset], predictors: list[PromptPredictor], log: ErrorLog,
             template: str = DEFAULT_TEMPLATE, min_area: int = DEFAULT_MIN_AREA
             ) -> list[dict[str, Any]]:
    """Every method on every COCO dataset; each image is loaded once for all methods."""
    phrase(template, "x")  # a bad template fails before any image is read
    return [_run_dataset(ds, predictors, log, template, min_area) for ds in datasets]


def _run_dataset(dataset: Dataset, predictors: list[PromptPredictor], log: ErrorLog,
                 template: str, min_area: int) -> dict[str, Any]:
    categories = {int(cid): str(cat.get("name", cid)) for cid, cat in dataset.coco.cats.items()}
    evaluators = [TextEvaluator(p, categories, template, min_area) for p in predictors]
    records: dict[str, list[dict[str, Any]]] = {p.name: [] for p in predictors}
    loop = MethodLoop([(p.name, ev.evaluate) for p, ev in zip(predictors, evaluators,
                                                             strict=True)])

    def has_instances(sample: Sample) -> bool:
        return bool(sample_instances(sample, categories, min_area))

    for sample, name, image_records in loop.run(dataset, log, desc=f"text {dataset.name}",
                                                keep=has_instances):
        records[name].extend({"image": sample.name, **r} for r in image_records)
    methods = {
        name: {**summarize(method_records), "seconds": round(loop.seconds[name], 3),
               "per_prompt": method_records}
        for name, method_records in records.items()
    }
    return {"images_evaluated": loop.images, "methods": methods}
