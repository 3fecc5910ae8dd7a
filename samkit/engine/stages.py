"""The data engine's three stages (paper §4) on top of the project database.

1. **Assisted-manual**: the annotator clicks, the model proposes, accepted masks are stored
   (the server's decode and accept endpoints; nothing to do here).
2. **Semi-automatic**: with the project's ``stage`` setting at 2, each image is first filled
   with the *confident* masks of the automatic generator (high predicted-IoU and stability
   thresholds) as candidates; the annotator keeps or deletes them, then clicks the objects
   they missed. :func:`prepare_image` does the fill, once per image, when the image is opened
   or ahead of time in the :class:`Prefetcher` thread.
3. **Fully automatic**: :func:`run_auto` (``samkit engine auto``) runs the segment-everything
   generator over every image nobody annotated, resumably and shardable across processes.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from samkit.engine.db import ImageRow, ModelVersion, NewAnnotation
from samkit.engine.model_service import CLICK_PATIENCE_S, ModelService
from samkit.engine.project import Project
from samkit.everything import GeneratorFactory, LoadedGenerator, select_shard
from samkit.images import load_image
from samkit.jobs import Job, run_jobs
from samkit.loading import warn_if_untrained
from samkit.rle import to_coco_rle

# A generated mask this similar to one the image already shows is not proposed again.
DUPLICATE_IOU = 0.8
PREFETCH_AHEAD = 2  # images after the opened one whose embeddings are computed in advance
AUTO_ANNOTATOR = "auto"

_prefill_lock = threading.Lock()  # one prefill at a time, so no image is filled twice


def prefill_options(project: Project) -> dict[str, Any]:
    """Generator settings for stage-2 candidates, from the project settings."""
    db = project.db
    return {
        "points_per_side": int(db.get_setting("prefill_points_per_side")),
        "pred_iou_thresh": float(db.get_setting("prefill_iou_thresh")),
        "stability_score_thresh": float(db.get_setting("prefill_stability_thresh")),
    }


def prepare_image(project: Project, service: ModelService, image: ImageRow,
                  patience: float = CLICK_PATIENCE_S, *, background: bool = False) -> int:
    """Make ``image`` ready for clicking: its embedding, and in stage 2 its candidates.
    Returns the number of candidates added now (0 when already filled)."""
    service.ensure_embedding(image, patience, background=background)
    if int(project.db.get_setting("stage")) != 2:
        return 0
    with _prefill_lock:
        if image.id in project.db.runs_done("prefill"):
            return 0
        start = time.perf_counter()
        records = service.generate(image, prefill_options(project), patience,
                                   background=background)
        items = new_candidates(project, image, records, service.version.id)
        project.db.add_annotations(
            items, run=(image.id, "prefill", service.version.id, time.perf_counter() - start)
        )
        return len(items)


def segment_everything(project: Project, service: ModelService, image: ImageRow,
                       options: dict[str, Any], patience: float = CLICK_PATIENCE_S) -> int:
    """The page's "segment everything" button: the generator's masks (``options`` are its
    arguments; by default its usual thresholds, not only the confident masks) as candidates
    to keep or delete."""
    records = service.generate(image, options, patience)
    items = new_candidates(project, image, records, service.version.id)
    project.db.add_annotations(items)
    return len(items)


def new_candidates(project: Project, image: ImageRow, records: Sequence[dict[str, Any]],
                   version_id: int) -> list[NewAnnotation]:
    """Generator records as stage-2 candidates, minus those the image already shows."""
    shown = [a["segmentation"] for a in project.db.annotations(image.id)]
    return [item for item in to_annotations(records, image.id, 2, "candidate", version_id, 0.0)
            if not _duplicates(item.segmentation, shown)]


def to_annotations(records: Sequence[dict[str, Any]], image_id: int, stage: int, status: str,
                   version_id: int, seconds_per_mask: float) -> list[NewAnnotation]:
    """Official generator records -> annotations (the prompt is the grid point)."""
    return [
        NewAnnotation(
            image_id=image_id, stage=stage, status=status,
            segmentation=to_coco_rle(r["segmentation"]), area=int(r["area"]),
            bbox=[int(round(v)) for v in r["bbox"]],
            prompts={"points": [[float(x), float(y), 1] for x, y in r["point_coords"]],
                     "box": None},
            score=float(r["predicted_iou"]), stability=float(r["stability_score"]),
            annotator=AUTO_ANNOTATOR, seconds=seconds_per_mask, model_version=version_id,
        )
        for r in records
    ]


def _duplicates(segmentation: dict[str, Any], shown: list[dict[str, Any]]) -> bool:
    if not shown:
        return False
    ious = mask_utils.iou([segmentation], shown, [0] * len(shown))
    return bool((ious >= DUPLICATE_IOU).any())


class Prefetcher:
    """A daemon thread that prepares the next images while the annotator works on one, so
    opening the next image is instant. It yields the model to every interactive request."""

    def __init__(self, project: Project, service: ModelService) -> None:
        self.project = project
        self.service = service
        self._queue: queue.Queue[int] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="samkit-prefetch", daemon=True)
        self._thread.start()

    def after(self, image_id: int) -> None:
        """Queue the :data:`PREFETCH_AHEAD` images following ``image_id``."""
        ids = [image.id for image in self.project.db.images()]
        if image_id in ids:
            start = ids.index(image_id) + 1
            for next_id in ids[start:start + PREFETCH_AHEAD]:
                self._queue.put(next_id)

    def _run(self) -> None:
        while True:
            image = self.project.db.image(self._queue.get())
            if image is None:
                continue
            try:
                prepare_image(self.project, self.service, image, background=True)
            except Exception as err:  # a bad file must not kill the thread; it is reported
                # when the annotator opens that image
                print(f"samkit: could not prepare image {image.file_name}: {err}",
                      file=sys.stderr)


# ----------------------------------------------------------------------------- stage 3
@dataclass(frozen=True)
class AutoSummary:
    done: int
    skipped: int
    failed: int
    masks: int

    def __str__(self) -> str:
        return (f"{self.done} image(s) segmented ({self.masks} masks), {self.skipped} skipped "
                f"(annotated or already done), {self.failed} failed")


def run_auto(project: Project, version: ModelVersion, shard: tuple[int, int],
             factory: GeneratorFactory) -> AutoSummary:
    """Stage 3: segment everything in each unannotated image of this shard, into the DB.

    Resumable: an image's masks and its "done" mark are one transaction, so a killed run
    redoes at most the image it was on, and a finished image is never done twice. Images with
    accepted stage-1/2 masks are left to their annotators. ``factory`` builds the generator
    (:class:`samkit.everything.GeneratorSpec` for the version's model).
    """
    db = project.db
    mine = select_shard(db.images(), shard)
    skip = db.images_with_accepted() | db.runs_done("auto")
    todo = [image for image in mine if image.id not in skip]

    def loaded() -> LoadedGenerator:  # only at the first image: a finished shard loads none
        generator = factory()
        warn_if_untrained(f"model version {version.id} ({version.model})", generator.trained,
                          fix="until it is trained")
        return generator

    def work(image: ImageRow, pixels: np.ndarray, generator: LoadedGenerator) -> int:
        start = time.perf_counter()
        records = generator.generate(pixels)
        seconds = time.perf_counter() - start
        items = to_annotations(records, image.id, 3, "accepted", version.id,
                               seconds / max(1, len(records)))
        # The masks and the image's "done" mark are one transaction.
        db.add_annotations(items, run=(image.id, "auto", version.id, seconds))
        return len(items)

    job = Job(read=lambda image: load_image(project.image_path(image.file_name)),
              worker=loaded, work=work, name=lambda image: image.file_name)
    counts = run_jobs(todo, job, desc=f"auto {shard[0]}/{shard[1]}")
    return AutoSummary(counts.done, len(mine) - len(todo), counts.failed, counts.outputs)

