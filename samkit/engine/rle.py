"""COCO RLE in and out of the engine.

Masks travel as compressed COCO RLE (``{"size": [h, w], "counts": str}``): a few hundred bytes
for a typical mask, encoded in about a millisecond, and the form SA-1B and COCO store. The web
page decodes it itself (``static/app.js``) and sends it back on accept.

A mask coming *from* a client is parsed here before pycocotools sees it: pycocotools' decoder
writes each run without checking that the runs add up to ``h * w``, so a crafted string would
write past its buffer. :func:`parse_rle` mirrors its parser exactly (``rleFrString``) and
checks every run.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from samkit.errors import SamkitError
from samkit.masks import masks_to_coco_rle

# Characters of the compressed alphabet: 6-bit groups offset by 48 ('0' .. 'o').
_FIRST, _LAST = 48, 48 + 63
# 7 groups of 5 bits reach 2**35, past any h * w a 100 MP image can have.
_MAX_GROUPS = 7


def encode_masks(masks: np.ndarray) -> list[dict[str, Any]]:
    """``N x H x W`` bool -> one ``{"segmentation", "area", "bbox"}`` per mask."""
    rles = masks_to_coco_rle(masks)
    return [{"segmentation": rle, **_area_bbox(rle)} for rle in rles]


def parse_rle(segmentation: Any, height: int, width: int) -> dict[str, Any]:
    """Validate a client's compressed RLE for an ``height x width`` image; returns
    ``{"segmentation", "area", "bbox"}`` computed here (never trusted from the client)."""
    if not isinstance(segmentation, dict) or set(segmentation) != {"size", "counts"}:
        raise SamkitError('a mask must be a COCO RLE {"size": [h, w], "counts": "..."}')
    size, counts = segmentation["size"], segmentation["counts"]
    if not isinstance(size, list) or size != [height, width]:
        raise SamkitError(f"mask size {size} does not match the {height}x{width} image")
    if not isinstance(counts, str) or len(counts) > _MAX_GROUPS * (height * width + 1):
        raise SamkitError("mask counts must be a compressed COCO RLE string")
    runs = _runs_from_string(counts)
    if any(r < 0 for r in runs) or sum(runs) != height * width:
        raise SamkitError(f"mask RLE runs do not cover the {height}x{width} image exactly")
    rle = {"size": [height, width], "counts": counts}
    described = _area_bbox(rle)
    if described["area"] == 0:
        raise SamkitError("the mask is empty")
    return {"segmentation": rle, **described}


def decode_rle(segmentation: dict[str, Any]) -> np.ndarray:
    """A stored (already validated) RLE -> ``H x W`` bool."""
    return mask_utils.decode(segmentation).astype(bool)


def _area_bbox(rle: dict[str, Any]) -> dict[str, Any]:
    return {
        "area": int(mask_utils.area(rle)),
        "bbox": [int(v) for v in mask_utils.toBbox(rle)],
    }


def _runs_from_string(counts: str) -> list[int]:
    """pycocotools' ``rleFrString``, with every malformed case an error instead of
    undefined behaviour: each run is 5-bit groups (low first; 0x20 = more follow, 0x10 in
    the last = negative), and runs after the second are stored as differences to the run
    two before."""
    runs: list[int] = []
    pos, end = 0, len(counts)
    while pos < end:
        value = groups = 0
        more = True
        while more:
            if pos >= end or groups >= _MAX_GROUPS:
                raise SamkitError("mask RLE string is malformed (truncated or overlong run)")
            code = ord(counts[pos])
            if not _FIRST <= code <= _LAST:
                raise SamkitError(f"mask RLE string has an invalid character {counts[pos]!r}")
            code -= _FIRST
            value |= (code & 0x1F) << (5 * groups)
            more = bool(code & 0x20)
            pos += 1
            groups += 1
            if not more and code & 0x10:
                value |= -1 << (5 * groups)
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs
