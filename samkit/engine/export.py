"""Accepted masks out of the project: SA-1B style (one JSON per image) or one COCO JSON.

Both store masks as compressed COCO RLE, load with pycocotools, and are training data for
``samkit train`` as they are:

* ``sa1b``: ``OUT/<image>.json`` next to a hard link (or copy) of each image, so
  ``samkit train --data OUT`` reads it like an SA-1B tar;
* ``coco``: ``OUT`` is an instances JSON (one category, ``object``) whose ``file_name`` is
  relative to ``PROJECT/images``: ``samkit train --data coco:OUT:PROJECT/images``.

Only images with at least one accepted mask are exported: an image without masks would read
as "nothing here" to a trainer, which is not what an unannotated image means.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from samkit.engine.db import ImageRow
from samkit.engine.project import Project, link_or_copy
from samkit.errors import SamkitError
from samkit.io import write_text_atomic

EXPORT_FORMATS = ("sa1b", "coco")
ALL_STAGES = (1, 2, 3)
EXPORT_MARKER = ".samkit-export"  # marks a folder as ours, so a re-export may clean it


def parse_stages(text: str) -> tuple[int, ...]:
    """``"1,2"`` -> ``(1, 2)``; only stages 1-3."""
    try:
        chosen = tuple(sorted({int(part) for part in text.split(",")}))
    except ValueError:
        chosen = ()
    if not chosen or not set(chosen) <= {1, 2, 3}:
        raise SamkitError(f"bad stages {text!r}: expected a comma-separated subset of 1,2,3")
    return chosen


def annotated_images(project: Project, stages: Sequence[int] = ALL_STAGES,
                     ) -> Iterator[tuple[ImageRow, list[dict[str, Any]]]]:
    """Each image with accepted masks of ``stages``, with those masks."""
    by_image: dict[int, list[dict[str, Any]]] = {}
    for annotation in project.db.annotations(statuses=("accepted",), stages=stages):
        by_image.setdefault(annotation["image_id"], []).append(annotation)
    for image in project.db.images():
        if image.id in by_image:
            yield image, by_image[image.id]


def sa1b_document(image: ImageRow, annotations: list[dict[str, Any]]) -> dict[str, Any]:
    """One image in the SA-1B schema (see :mod:`samkit.data.sa1b`), plus each mask's stage."""
    return {
        "image": {"image_id": image.id, "file_name": image.file_name,
                  "width": image.width, "height": image.height},
        "annotations": [
            {
                "id": a["id"],
                "segmentation": a["segmentation"],
                "area": a["area"],
                "bbox": a["bbox"],
                "predicted_iou": a["score"],
                "point_coords": [p[:2] for p in (a["prompts"] or {}).get("points", [])],
                "stability_score": a["stability"],
                "crop_box": [0, 0, image.width, image.height],
                "stage": a["stage"],
            }
            for a in annotations
        ],
    }


def coco_document(project: Project, stages: Sequence[int] = ALL_STAGES) -> dict[str, Any]:
    """All accepted masks as one COCO instances document."""
    images, annotations = [], []
    for image, masks in annotated_images(project, stages):
        images.append({"id": image.id, "file_name": image.file_name,
                       "width": image.width, "height": image.height})
        annotations.extend(
            {"id": a["id"], "image_id": image.id, "category_id": 1,
             "segmentation": a["segmentation"], "area": a["area"], "bbox": a["bbox"],
             "iscrowd": 0, "score": a["score"], "stage": a["stage"]}
            for a in masks
        )
    return {
        "info": {"description": f"samkit data engine export of {project.root.name}"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "object", "supercategory": "object"}],
    }


def sa1b_zip(project: Project, stages: Sequence[int] = ALL_STAGES) -> bytes:
    """The SA-1B JSONs (without images) as a zip, for download from the web page."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for image, masks in annotated_images(project, stages):
            archive.writestr(json_name(image), json.dumps(sa1b_document(image, masks)))
    return buffer.getvalue()


def json_name(image: ImageRow) -> str:
    """``a.jpg`` -> ``a.jpg.json``: the full name, since ``a.jpg`` and ``a.png`` may both
    exist."""
    return f"{image.file_name}.json"


def export(project: Project, fmt: str, out: Path, stages: Sequence[int] = ALL_STAGES,
           ) -> tuple[int, int]:
    """Write the export; returns (images, masks)."""
    if fmt not in EXPORT_FORMATS:
        raise SamkitError(f"unknown export format {fmt!r}; choose {' or '.join(EXPORT_FORMATS)}")
    if fmt == "coco":
        document = coco_document(project, stages)
        if out.is_dir():
            raise SamkitError(f"--format coco writes one JSON file; {out} is a folder")
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out, json.dumps(document))
        return len(document["images"]), len(document["annotations"])
    _prepare_export_dir(out)
    n_images = n_masks = 0
    for image, masks in annotated_images(project, stages):
        target = out / image.file_name
        if not target.exists():
            link_or_copy(project.image_path(image.file_name), target)
        write_text_atomic(out / json_name(image), json.dumps(sa1b_document(image, masks)))
        n_images, n_masks = n_images + 1, n_masks + len(masks)
    return n_images, n_masks


def _prepare_export_dir(out: Path) -> None:
    """A new or empty folder, or an earlier export (whose JSONs are removed, so images that
    lost all their masks since do not linger)."""
    if out.exists() and not out.is_dir():
        raise SamkitError(f"--format sa1b writes a folder; {out} is a file")
    if out.is_dir() and any(out.iterdir()):
        if not (out / EXPORT_MARKER).is_file():
            raise SamkitError(f"{out} is not empty and not an earlier samkit export; "
                              "choose a new folder")
        for old in out.glob("*.json"):
            old.unlink()
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / EXPORT_MARKER).touch()
    except OSError as err:
        raise SamkitError(f"cannot write to {out}: {err.strerror or err}") from None
