"""Evaluation datasets, loaded one item at a time so a bad item costs only itself.

Three layouts:

* **mask folders** (GrabCut, COCO_MVal, DAVIS-style): ``images/<stem>.<ext>`` and
  ``masks/<stem>.png`` of the same size, read by the rule training uses too
  (:mod:`samkit.data.masks`: palette, 0/255, GrabCut's 0/128/255, id masks).
* **COCO instances**: ``annotations/instances.json`` (or the only ``*.json`` there) and
  ``images/<file_name>``; every non-crowd annotation is an object (:mod:`samkit.data.coco`).
* **BSDS500**: ``images/<id>.jpg`` and ``groundTruth/<id>.mat`` with the human boundary maps.

Loading an item raises :class:`~samkit.errors.SamkitError` with a one-line reason; objects
that are bad on their own (an empty COCO polygon) are reported in :attr:`Sample.errors` while
the rest of the image is still evaluated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from samkit.data.coco import image_objects, open_coco
from samkit.data.masks import ObjectMask, read_mask_objects
from samkit.errors import SamkitError
from samkit.images import load_image
from samkit.io import image_files

@dataclass
class Sample:
    """A loaded image with its objects (or boundary maps) and per-object problems."""

    name: str
    image: np.ndarray
    objects: list[ObjectMask] = field(default_factory=list)
    boundaries: list[np.ndarray] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    image_id: int | None = None  # COCO image id


@dataclass(frozen=True)
class Item:
    """One entry of a dataset; :meth:`load` does the work and may raise ``SamkitError``."""

    name: str
    loader: Callable[[], Sample]

    def load(self) -> Sample:
        return self.loader()


@dataclass
class Dataset:
    """A dataset's items plus what was wrong at the listing stage (e.g. orphan masks)."""

    name: str
    path: Path
    kind: str  # "masks", "coco" or "bsds"
    items: list[Item]
    errors: list[str] = field(default_factory=list)
    coco: Any = None  # pycocotools COCO for "coco" datasets


def open_dataset(path: Path, limit: int | None = None) -> Dataset:
    """Recognise the layout of ``path`` and list its items (the first ``limit`` of them,
    sorted by name)."""
    if not path.is_dir():
        raise SamkitError(f"dataset folder not found: {path}")
    if (path / "groundTruth").is_dir():
        dataset = bsds_dataset(path)
    elif (path / "annotations").is_dir():
        dataset = coco_dataset(path)
    elif (path / "masks").is_dir() and (path / "images").is_dir():
        dataset = mask_folder_dataset(path)
    else:
        raise SamkitError(
            f"{path}: unknown dataset layout; expected images/ + masks/, "
            "annotations/*.json + images/, or images/ + groundTruth/ (BSDS500)"
        )
    if limit is not None:
        dataset.items = dataset.items[:limit]
    return dataset


def require_kind(dataset: Dataset, kinds: tuple[str, ...], protocol: str) -> None:
    if dataset.kind not in kinds:
        raise SamkitError(
            f"{dataset.path}: a {dataset.kind!r} dataset cannot be used for `eval {protocol}` "
            f"(needs {' or '.join(kinds)})"
        )


def _images_by_stem(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in image_files(folder)}


# ---------------------------------------------------------------------------- mask folders
def mask_folder_dataset(root: Path) -> Dataset:
    images = _images_by_stem(root / "images")
    masks = {p.stem: p for p in sorted((root / "masks").glob("*.png"))}
    items = [
        Item(stem, _mask_loader(stem, path, root / "masks" / f"{stem}.png"))
        for stem, path in sorted(images.items())
    ]
    orphans = [f"{stem}: mask masks/{masks[stem].name} has no image" for stem in masks
               if stem not in images]
    return Dataset(root.name, root, "masks", items, errors=orphans)


def _mask_loader(stem: str, image_path: Path, mask_path: Path) -> Callable[[], Sample]:
    def load() -> Sample:
        if not mask_path.is_file():
            raise SamkitError(f"no mask file masks/{mask_path.name}")
        image = load_image(image_path)
        objects = read_mask_objects(mask_path, image.shape[:2])
        if not objects:
            raise SamkitError(f"mask {mask_path.name} has no object pixels")
        return Sample(stem, image, objects=objects)

    return load


# ---------------------------------------------------------------------------- COCO
def coco_dataset(root: Path) -> Dataset:
    """COCO instances: the annotation file is parsed and checked now (a malformed file fails
    the whole dataset; an annotation whose segmentation cannot be decoded is reported and
    dropped, so COCOeval never trips on it), images are read per item."""
    coco, errors = open_coco(_annotation_file(root / "annotations"))
    image_dir = root / "images" if (root / "images").is_dir() else root
    items = [
        Item(str(coco.imgs[i].get("file_name", i)), _coco_loader(coco, i, image_dir))
        for i in sorted(coco.imgs)
    ]
    return Dataset(root.name, root, "coco", items, errors=errors, coco=coco)


def _annotation_file(folder: Path) -> Path:
    preferred = folder / "instances.json"
    if preferred.is_file():
        return preferred
    candidates = sorted(folder.glob("*.json"))
    if len(candidates) != 1:
        raise SamkitError(
            f"{folder}: expected instances.json or exactly one *.json, found {len(candidates)}"
        )
    return candidates[0]


def _coco_loader(coco: Any, image_id: int, image_dir: Path) -> Callable[[], Sample]:
    def load() -> Sample:
        info = coco.imgs[image_id]
        name = str(info.get("file_name", image_id))
        image = load_image(image_dir / name)
        expected = (info.get("height"), info.get("width"))
        if expected != image.shape[:2]:
            raise SamkitError(
                f"annotation says {expected[1]}x{expected[0]} but the image is "
                f"{image.shape[1]}x{image.shape[0]}"
            )
        objects, errors = image_objects(coco, image_id)
        return Sample(name, image, objects=objects, errors=errors, image_id=image_id)

    return load


# ---------------------------------------------------------------------------- BSDS500
def bsds_dataset(root: Path) -> Dataset:
    images = _images_by_stem(root / "images")
    items = [
        Item(stem, _bsds_loader(stem, path, root / "groundTruth" / f"{stem}.mat"))
        for stem, path in sorted(images.items())
    ]
    return Dataset(root.name, root, "bsds", items)


def _bsds_loader(stem: str, image_path: Path, mat_path: Path) -> Callable[[], Sample]:
    def load() -> Sample:
        if not mat_path.is_file():
            raise SamkitError(f"no ground truth groundTruth/{mat_path.name}")
        image = load_image(image_path)
        boundaries = read_bsds_boundaries(mat_path)
        for b in boundaries:
            if b.shape != image.shape[:2]:
                raise SamkitError(
                    f"ground truth {mat_path.name} is {b.shape[1]}x{b.shape[0]} but the image "
                    f"is {image.shape[1]}x{image.shape[0]}"
                )
        return Sample(stem, image, boundaries=boundaries)

    return load


def read_bsds_boundaries(path: Path) -> list[np.ndarray]:
    """The human boundary maps (``H x W`` bool, one per annotator) of a BSDS ``.mat``."""
    import scipy.io

    try:
        cells = scipy.io.loadmat(str(path))["groundTruth"]
        maps = [cells[0, k]["Boundaries"][0, 0].astype(bool) for k in range(cells.shape[1])]
    except Exception as err:  # not a .mat, or not the BSDS structure
        raise SamkitError(f"cannot read BSDS ground truth {path.name}: {err}") from None
    if not maps:
        raise SamkitError(f"BSDS ground truth {path.name} has no annotations")
    return maps
