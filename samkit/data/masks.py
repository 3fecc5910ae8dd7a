"""The one rule for mask PNGs, shared by training (``samkit train``) and evaluation.

A mask folder pairs ``images/<stem>.<ext>`` with ``masks/<stem>.png`` of the same size:

* a **palette** (``P`` mode) PNG is one object per palette index; 0 is background and 255 is
  "void" (DAVIS / PASCAL VOC), an ignored region, not an object;
* a **gray** PNG holding only 0 / 255 is one object; one holding 0 / 128 / 255 is
  GrabCut-style, 128 marking the unlabelled band around the boundary (ignored);
* any other gray PNG is an **id mask**, one object per non-zero value.

Ignored pixels count neither for the IoU nor as click errors in evaluation; training has no
ignore notion, so there they are simply not part of the object.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from samkit.errors import SamkitError
from samkit.images import DECODE_ERRORS

GRABCUT_IGNORE = 128
VOID_INDEX = 255


@dataclass(frozen=True)
class ObjectMask:
    """One ground-truth object: ``mask`` and optional ``ignore`` (both ``H x W`` bool), and
    its COCO category (``None`` for mask folders, which have none)."""

    mask: np.ndarray
    ignore: np.ndarray | None
    label: str
    category_id: int | None = None


def read_mask_objects(path: Path, size: tuple[int, int]) -> list[ObjectMask]:
    """The objects of a mask PNG of image size ``size`` (H, W); [] when it has none."""
    try:
        with Image.open(path) as im:
            im.load()
            mode, array = im.mode, np.asarray(im)
    except DECODE_ERRORS as err:
        raise SamkitError(f"cannot read mask {path.name}: {str(err).splitlines()[0]}") from None
    if array.shape[:2] != tuple(size):
        raise SamkitError(
            f"mask {path.name} is {array.shape[1]}x{array.shape[0]} but the image is "
            f"{size[1]}x{size[0]}"
        )
    if mode == "P":
        return _palette_objects(array)
    return _gray_objects(_as_gray(array, path.name))


def object_masks(objects: list[ObjectMask], size: tuple[int, int]) -> np.ndarray:
    """``N x H x W`` bool of the objects' masks (``0 x H x W`` for none): training's view."""
    if not objects:
        return np.zeros((0, *size), dtype=bool)
    return np.stack([o.mask for o in objects])


def _as_gray(array: np.ndarray, name: str) -> np.ndarray:
    if array.ndim == 3:
        if not (array[..., :3] == array[..., :1]).all():
            raise SamkitError(
                f"mask {name} is a colour image; use a gray (0/255, ids) or palette PNG"
            )
        array = array[..., 0]
    return array.astype(np.int64)


def _palette_objects(index: np.ndarray) -> list[ObjectMask]:
    void = index == VOID_INDEX
    ignore = void if void.any() else None
    ids = [int(v) for v in np.unique(index) if v not in (0, VOID_INDEX)]
    return [ObjectMask(index == i, ignore, f"palette index {i}") for i in ids]


def _gray_objects(gray: np.ndarray) -> list[ObjectMask]:
    values = set(np.unique(gray).tolist())
    if values <= {0, 255}:
        return [ObjectMask(gray == 255, None, "foreground")] if 255 in values else []
    if values <= {0, GRABCUT_IGNORE, 255}:
        band = gray == GRABCUT_IGNORE
        return [ObjectMask(gray == 255, band, "foreground")] if 255 in values else []
    return [ObjectMask(gray == v, None, f"id {v}") for v in sorted(values - {0})]
