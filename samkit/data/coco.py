"""COCO instances files, read the same way by training and evaluation: the file is checked
when opened (a malformed file is one clear error), annotations pycocotools cannot decode are
dropped with one message each, and an image's objects are its non-crowd, non-empty masks."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path
from typing import Any

from samkit.data.masks import ObjectMask
from samkit.errors import SamkitError
from samkit.images import DEFAULT_MAX_PIXELS
from samkit.rle import parse_rle


def open_coco(path: Path) -> tuple[Any, list[str]]:
    """``(pycocotools COCO, messages about the annotations dropped)`` for an instances file."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = _read_coco_json(path)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        try:
            coco.createIndex()
        except (KeyError, TypeError, ValueError) as err:
            raise SamkitError(f"{path} is not a usable COCO instances file ({err!r})") from None
    return coco, _drop_undecodable(coco)


def image_objects(coco: Any, image_id: int) -> tuple[list[ObjectMask], list[str]]:
    """The objects of one image (crowd regions are not single objects) and the annotations
    left out because their mask is empty."""
    objects, errors = [], []
    for ann in coco.imgToAnns.get(image_id, []):
        if ann.get("iscrowd", 0):
            continue
        mask = coco.annToMask(ann).astype(bool)
        if not mask.any():
            errors.append(f"annotation {ann['id']}: empty mask")
            continue
        objects.append(ObjectMask(mask, None, f"annotation {ann['id']}", ann.get("category_id")))
    return objects, errors


def _drop_undecodable(coco: Any) -> list[str]:
    """Remove annotations pycocotools cannot turn into a mask; one message per removal."""
    errors, good = [], []
    for ann in coco.dataset["annotations"]:
        try:
            if ann["image_id"] not in coco.imgs:
                raise ValueError(f"unknown image_id {ann['image_id']}")
            _check_segmentation(ann["segmentation"], coco.imgs[ann["image_id"]])
            coco.annToRLE(ann)
            good.append(ann)
        except Exception as err:  # malformed polygon / RLE / fields: this annotation only
            name = coco.imgs.get(ann.get("image_id"), {}).get("file_name", ann.get("image_id"))
            errors.append(f"{name}: annotation {ann['id']}: bad segmentation ({err})")
    if errors:
        coco.dataset["annotations"] = good
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
    return errors


def _check_segmentation(segmentation: Any, image: dict[str, Any]) -> None:
    """Raise ``ValueError``/``SamkitError`` unless ``segmentation`` is a mask pycocotools can
    decode for ``image``: a compressed RLE is checked run by run before pycocotools reads it
    (:func:`samkit.rle.parse_rle`; a crafted string would make it read past its buffer)."""
    height, width = int(image["height"]), int(image["width"])
    if not (0 < height and 0 < width and height * width <= DEFAULT_MAX_PIXELS):
        raise ValueError(f"image size {width}x{height}")
    if isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), str):
        parse_rle(segmentation, height, width, allow_empty=True)
    elif isinstance(segmentation, dict):  # uncompressed RLE: a list of run lengths
        counts = segmentation.get("counts")
        if (segmentation.get("size") != [height, width] or not isinstance(counts, list)
                or not all(type(c) is int and c >= 0 for c in counts)
                or sum(counts) != height * width):
            raise ValueError("uncompressed RLE must be non-negative runs covering the image")
    elif isinstance(segmentation, list) and segmentation:  # polygons
        for polygon in segmentation:
            if (not isinstance(polygon, list) or len(polygon) < 6 or len(polygon) % 2
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                               and math.isfinite(v) for v in polygon)):
                raise ValueError("a polygon must be a list of at least 3 finite x, y pairs")
    else:
        raise ValueError("segmentation must be polygons or an RLE")


def _read_coco_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SamkitError(f"cannot read COCO annotations {path}: {err}") from None
    if not isinstance(data, dict) or not all(
        isinstance(data.get(key), list) for key in ("images", "annotations", "categories")
    ):
        raise SamkitError(
            f"{path} is not a COCO instances file (needs lists 'images', 'annotations', "
            "'categories')"
        )
    for key in ("images", "annotations", "categories"):
        bad = [entry for entry in data[key] if not isinstance(entry, dict) or "id" not in entry]
        if bad:
            raise SamkitError(f"{path}: {len(bad)} {key} entries without an 'id'")
    return data
