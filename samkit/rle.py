"""Every COCO run-length encoding in samkit, one home: masks <-> RLE, compressed or not.

Two forms, both COCO's (column-major runs over the flattened mask, starting with a run of
zeros): *uncompressed* ``{"size": [H, W], "counts": [int, ...]}``, what segment-everything
builds on the device for a whole batch at once (:func:`masks_to_rle`), and *compressed*
``{"size": [H, W], "counts": str}``, what SA-1B, COCO and the annotation app store
(:func:`to_coco_rle` turns any mask or RLE into it; ``counts`` is always ``str``, so it is
valid JSON).

A compressed RLE coming from a client is checked by :func:`parse_rle` before pycocotools
sees it: pycocotools' decoder writes each run without checking that the runs add up to
``h * w``, so a crafted string would write past its buffer. :func:`parse_rle` mirrors its
parser exactly (``rleFrString``) and checks every run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from pycocotools import mask as mask_utils

from samkit.errors import SamkitError

if TYPE_CHECKING:
    import torch  # masks_to_rle's masks are tensors: torch is loaded when it runs

Rle = dict[str, Any]

# Characters of the compressed alphabet: 6-bit groups offset by 48 ('0' .. 'o').
_FIRST, _LAST = 48, 48 + 63
# 7 groups of 5 bits reach 2**35, past any h * w a 100 MP image can have.
_MAX_GROUPS = 7


def masks_to_rle(masks: torch.Tensor) -> list[Rle]:
    """``B x H x W`` bool masks -> uncompressed COCO RLEs, for the whole batch at once.

    Each mask is flattened column-major behind one virtual 0 pixel; the run starts are the
    positions where a pixel differs from its predecessor, and the counts are the gaps
    between consecutive starts (a mask starting with 1 thus begins with a 0-length run).
    """
    import torch

    b, h, w = masks.shape
    n = h * w
    flat = masks.new_zeros(b, n + 1)
    flat[:, 1:].view(b, w, h).copy_(masks.transpose(1, 2))
    mask_idx, starts = (flat[:, 1:] != flat[:, :-1]).nonzero(as_tuple=True)
    # Gap to the previous start of the same mask (or to 0 for its first start).
    first = torch.ones_like(mask_idx, dtype=torch.bool)
    first[1:] = mask_idx[1:] != mask_idx[:-1]
    gaps = starts - torch.where(first, 0, starts.roll(1))
    last = torch.zeros(b, dtype=starts.dtype, device=starts.device)
    last.scatter_reduce_(0, mask_idx, starts, reduce="amax")
    tails = (n - last).tolist()  # the final run, up to the end of the mask
    # One transfer to Python ints, then plain list slicing per mask.
    ends = torch.bincount(mask_idx, minlength=b).cumsum(0).tolist()
    all_gaps = gaps.tolist()
    return [
        {"size": [h, w], "counts": all_gaps[start:end] + [tail]}
        for start, end, tail in zip([0, *ends[:-1]], ends, tails)
    ]


def rle_to_mask(rle: Rle) -> np.ndarray:
    """Uncompressed RLE -> ``H x W`` bool array."""
    h, w = rle["size"]
    counts = rle["counts"]
    values = np.arange(len(counts)) % 2 == 1  # runs alternate 0, 1, 0, ...
    mask = np.repeat(values, counts).reshape(w, h)  # column-major runs
    return np.ascontiguousarray(mask.T)


def area_from_rle(rle: Rle) -> int:
    """Foreground pixel count of an uncompressed RLE (the odd runs)."""
    return int(sum(rle["counts"][1::2]))


def coco_encode_rle(uncompressed_rle: Rle) -> Rle:
    """Uncompressed RLE -> compressed COCO RLE with ``counts`` as ``str`` (JSON-ready)."""
    h, w = uncompressed_rle["size"]
    rle = mask_utils.frPyObjects(uncompressed_rle, h, w)
    rle["counts"] = rle["counts"].decode("utf-8")
    return rle


def masks_to_coco_rle(masks: np.ndarray) -> list[Rle]:
    """``B x H x W`` bool masks -> compressed COCO RLEs (``counts`` as ``str``)."""
    fortran = np.asfortranarray(np.moveaxis(masks, 0, -1).astype(np.uint8))
    rles = mask_utils.encode(fortran)
    for rle in rles:
        rle["counts"] = rle["counts"].decode("utf-8")
    return rles


def to_coco_rle(segmentation: np.ndarray | Rle) -> Rle:
    """A binary ``H x W`` mask or an RLE (compressed or not) -> compressed COCO RLE with
    ``counts`` as ``str``."""
    if isinstance(segmentation, np.ndarray):
        rle = mask_utils.encode(np.asfortranarray(segmentation.astype(np.uint8)))
    elif isinstance(segmentation["counts"], list):
        height, width = segmentation["size"]
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    counts = rle["counts"]
    return {
        "size": [int(v) for v in rle["size"]],
        "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts,
    }


def area_and_bbox(rle: Rle) -> dict[str, Any]:
    """``{"area": pixels, "bbox": [x, y, w, h]}`` of a compressed RLE."""
    return {
        "area": int(mask_utils.area(rle)),
        "bbox": [int(v) for v in mask_utils.toBbox(rle)],
    }


def encode_masks(masks: np.ndarray) -> list[dict[str, Any]]:
    """``N x H x W`` bool -> one ``{"segmentation", "area", "bbox"}`` per mask."""
    rles = masks_to_coco_rle(masks)
    return [{"segmentation": rle, **area_and_bbox(rle)} for rle in rles]


def parse_rle(segmentation: Any, height: int, width: int, *,
              allow_empty: bool = False) -> dict[str, Any]:
    """Validate a client's compressed RLE for an ``height x width`` image; returns
    ``{"segmentation", "area", "bbox"}`` computed here (never trusted from the client).

    An empty mask is an error unless ``allow_empty`` (files written by segment-everything with
    its filters off may hold empty masks; a client's new annotation may not)."""
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
    described = area_and_bbox(rle)
    if described["area"] == 0 and not allow_empty:
        raise SamkitError("the mask is empty")
    return {"segmentation": rle, **described}


def decode_rle(segmentation: dict[str, Any]) -> np.ndarray:
    """A stored (already validated) RLE -> ``H x W`` bool."""
    return mask_utils.decode(segmentation).astype(bool)


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
