"""Evaluation datasets, loaded one item at a time so a bad item costs only itself.

Three layouts:

* **mask folders** (GrabCut, COCO_MVal, DAVIS-style): ``images/<stem>.<ext>`` and
  ``masks/<stem>.png`` of the same size. A palette (``P`` mode) PNG gives one object per palette
  index (0 is background, 255 is "void" and left out of the IoU, as in DAVIS / PASCAL VOC). A
  gray PNG holding only 0 / 255 is one object; one holding 0 / 128 / 255 is GrabCut-style, 128
  marking the unlabelled band around the boundary that is left out of the IoU; any other gray
  PNG is an id mask, one object per non-zero value.
* **COCO instances**: ``annotations/instances.json`` (or the only ``*.json`` there) and
  ``images/<file_name>``; every non-crowd annotation is an object.
* **BSDS500**: ``images/<id>.jpg`` and ``groundTruth/<id>.mat`` with the human boundary maps.

Loading an item raises :class:`~samkit.errors.SamkitError` with a one-line reason; objects
that are bad on their own (an empty COCO polygon) are reported in :attr:`Sample.errors` while
the rest of the image is still evaluated.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from samkit.errors import SamkitError
from samkit.images import load_image
from samkit.io import image_files

GRABCUT_IGNORE = 128
VOID_INDEX = 255


@dataclass(frozen=True)
class ObjectMask:
    """One ground-truth object: ``mask`` and optional ``ignore`` (both ``H x W`` bool);
    ignored pixels count neither for the IoU nor as click errors."""

    mask: np.ndarray
    ignore: np.ndarray | None
    label: str


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
        return Sample(stem, image, objects=objects)

    return load


def read_mask_objects(path: Path, size: tuple[int, int]) -> list[ObjectMask]:
    """The objects of a mask PNG (see the module docstring for the encodings)."""
    try:
        with Image.open(path) as im:
            im.load()
            mode, array = im.mode, np.asarray(im)
    except (OSError, ValueError) as err:
        raise SamkitError(f"cannot read mask {path.name}: {str(err).splitlines()[0]}") from None
    if array.shape[:2] != size:
        raise SamkitError(
            f"mask {path.name} is {array.shape[1]}x{array.shape[0]} but the image is "
            f"{size[1]}x{size[0]}"
        )
    if mode == "P":
        objects = _palette_objects(array)
    else:
        objects = _gray_objects(_as_gray(array, path.name))
    if not objects:
        raise SamkitError(f"mask {path.name} has no object pixels")
    return objects


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


# ---------------------------------------------------------------------------- COCO
def coco_dataset(root: Path) -> Dataset:
    """COCO instances: the annotation file is parsed and checked now (a malformed file fails
    the whole dataset; an annotation whose segmentation cannot be decoded is reported and
    dropped, so COCOeval never trips on it), images are read per item."""
    from pycocotools.coco import COCO

    ann_file = _annotation_file(root / "annotations")
    coco = COCO()
    coco.dataset = _read_coco_json(ann_file)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    errors = _drop_undecodable(coco)
    image_dir = root / "images" if (root / "images").is_dir() else root
    items = [
        Item(str(coco.imgs[i].get("file_name", i)), _coco_loader(coco, i, image_dir))
        for i in sorted(coco.imgs)
    ]
    return Dataset(root.name, root, "coco", items, errors=errors, coco=coco)


def _drop_undecodable(coco: Any) -> list[str]:
    """Remove annotations pycocotools cannot turn into a mask; one message per removal."""
    errors, good = [], []
    for ann in coco.dataset["annotations"]:
        try:
            if ann["image_id"] not in coco.imgs:
                raise ValueError(f"unknown image_id {ann['image_id']}")
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


def _read_coco_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SamkitError(f"cannot read COCO annotations {path}: {err}") from None
    if not isinstance(data, dict) or not all(
        isinstance(data.get(key), list) for key in ("images", "annotations", "categories")
    ):
        raise SamkitError(
            f"{path} is not a COCO instances file (needs lists 'images', 'annotations', "
            "'categories')"
        )
    for key in ("images", "annotations"):
        bad = [entry for entry in data[key] if not isinstance(entry, dict) or "id" not in entry]
        if bad:
            raise SamkitError(f"{path}: {len(bad)} {key} entries without an 'id'")
    return data


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
        sample = Sample(name, image, image_id=image_id)
        for ann in coco.imgToAnns.get(image_id, []):
            if ann.get("iscrowd", 0):
                continue  # crowd regions are not single objects
            mask = coco.annToMask(ann).astype(bool)
            if not mask.any():
                sample.errors.append(f"annotation {ann['id']}: empty mask")
                continue
            sample.objects.append(ObjectMask(mask, None, f"annotation {ann['id']}"))
        return sample

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
