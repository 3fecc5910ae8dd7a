"""Reading SA-1B and ``samkit everything`` output: one JSON of COCO-RLE masks per image.

Both use the SA-1B schema::

    {"image": {"image_id", "file_name", "width", "height", ...},
     "annotations": [{"id", "segmentation": {"size": [h, w], "counts": str}, "area",
                      "bbox": [x, y, w, h], "predicted_iou", "point_coords",
                      "stability_score", "crop_box"}, ...]}

SA-1B ships ``sa_XXXX.jpg`` and ``sa_XXXX.json`` side by side; ``samkit everything`` writes
the JSONs to their own folder and records each image's path relative to the image root in
``file_name``. Either way the image is ``image_dir / file_name``.

Only the list of JSON files is read up front: a record is parsed when it is asked for, so a
dataset of millions of images opens instantly and costs no memory until used.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from samkit.errors import SamkitError


@dataclass(frozen=True)
class SA1BSample:
    """One image's annotations; ``record`` is the whole parsed JSON."""

    image_path: Path
    json_path: Path
    image_id: int
    width: int
    height: int
    annotations: list[dict[str, Any]]
    record: dict[str, Any]


class SA1BDataset:
    """Indexable, iterable view of a folder of SA-1B-schema JSON files.

    Args:
        json_dir: folder holding the ``*.json`` files (not searched recursively).
        image_dir: root that ``file_name`` is relative to; default ``json_dir`` (SA-1B layout).
    """

    def __init__(self, json_dir: str | Path, image_dir: str | Path | None = None) -> None:
        self.json_dir = Path(json_dir)
        if not self.json_dir.is_dir():
            raise SamkitError(f"annotation folder not found: {self.json_dir}")
        self.image_dir = Path(image_dir) if image_dir is not None else self.json_dir
        # Hidden files are skipped: they are temporary files of a writer still at work.
        self.json_paths = sorted(
            p for p in self.json_dir.glob("*.json") if not p.name.startswith(".")
        )

    def __len__(self) -> int:
        return len(self.json_paths)

    def __getitem__(self, index: int) -> SA1BSample:
        return self.load(self.json_paths[index])

    def __iter__(self) -> Iterator[SA1BSample]:
        return (self.load(path) for path in self.json_paths)

    def load(self, json_path: Path) -> SA1BSample:
        """Parse one JSON file into a sample; a malformed file is a :class:`SamkitError`."""
        try:
            record = json.loads(json_path.read_text(encoding="utf-8"))
            image = record["image"]
            return SA1BSample(
                image_path=self.image_dir / image["file_name"],
                json_path=json_path,
                image_id=int(image["image_id"]),
                width=int(image["width"]),
                height=int(image["height"]),
                annotations=list(record["annotations"]),
                record=record,
            )
        except (OSError, ValueError, KeyError, TypeError, OverflowError) as err:
            raise SamkitError(f"bad annotation file {json_path}: {err!r}") from None


def decode_masks(record: SA1BSample | Mapping[str, Any]) -> np.ndarray:
    """All masks of a sample (or a parsed JSON record) as ``N x H x W`` bool.

    Every RLE is checked first (:func:`samkit.rle.parse_rle`: its size is the image's, its
    runs cover the image exactly), so a malformed file is a :class:`SamkitError` naming it,
    never pycocotools reading past a buffer."""
    from pycocotools import mask as mask_utils

    from samkit.images import DEFAULT_MAX_PIXELS
    from samkit.rle import parse_rle

    source = record.json_path if isinstance(record, SA1BSample) else "record"
    if isinstance(record, SA1BSample):
        record = record.record
    try:
        height, width = int(record["image"]["height"]), int(record["image"]["width"])
        if not (0 < height and 0 < width and height * width <= DEFAULT_MAX_PIXELS):
            raise SamkitError(f"image size {width}x{height} is not a real image's")
        rles = [parse_rle(a["segmentation"], height, width, allow_empty=True)["segmentation"]
                for a in record["annotations"]]
    except SamkitError as err:
        raise SamkitError(f"bad annotation file {source}: {err}") from None
    except (KeyError, TypeError, ValueError, OverflowError) as err:
        raise SamkitError(f"bad annotation file {source}: {err!r}") from None
    if not rles:
        return np.zeros((0, height, width), dtype=bool)
    # pycocotools stacks masks last (H x W x N).
    return np.ascontiguousarray(mask_utils.decode(rles).transpose(2, 0, 1).astype(bool))
