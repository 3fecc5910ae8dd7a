"""Mask utilities for segment-everything (paper App. B): point grids, crops, box maths,
stability score, NMS and small-region clean-up (run-length encoding: :mod:`samkit.rle`).

Tensors stay on whatever device they arrive on; masks are ``... x H x W`` and boxes are XYXY
pixel coordinates (``x1``/``y1`` inclusive for boxes computed from masks, as in the official
code).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from itertools import product
from typing import Any

import numpy as np
import torch

from samkit.errors import SamkitError

Rle = dict[str, Any]
NmsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]

_NMS_BLOCK_ELEMENTS = 1 << 22  # IoU entries computed at once by greedy_batched_nms


# ---------------------------------------------------------------------------- point grids, crops
def build_point_grid(n_per_side: int) -> np.ndarray:
    """``n^2 x 2`` (x, y) points at the centres of an ``n x n`` tiling of ``[0, 1]^2``,
    row by row (x varies fastest)."""
    offset = 1 / (2 * n_per_side)
    ticks = np.linspace(offset, 1 - offset, n_per_side)
    xs, ys = np.meshgrid(ticks, ticks)
    return np.stack([xs.ravel(), ys.ravel()], axis=-1)


def build_all_layer_point_grids(
    n_per_side: int, n_layers: int, scale_per_layer: int
) -> list[np.ndarray]:
    """One grid per crop layer ``0..n_layers``; layer ``i`` has ``n_per_side / scale**i``
    points per side (rounded down)."""
    return [build_point_grid(int(n_per_side / scale_per_layer**i)) for i in range(n_layers + 1)]


def generate_crop_boxes(
    im_size: tuple[int, int], n_layers: int, overlap_ratio: float
) -> tuple[list[list[int]], list[int]]:
    """Crop boxes (XYXY ints) and their layer index: the whole image, then for layer
    ``i >= 1`` a ``2^i x 2^i`` set of overlapping crops, column by column.

    Neighbouring crops of layer ``i`` overlap by ``overlap_ratio * short_side * 2 / 2^i``
    pixels (rounded down).
    """
    im_h, im_w = im_size
    boxes, layers = [[0, 0, im_w, im_h]], [0]
    for layer in range(1, n_layers + 1):
        n_side = 2**layer
        overlap = int(overlap_ratio * min(im_h, im_w) * 2 / n_side)
        crop_w = math.ceil((overlap * (n_side - 1) + im_w) / n_side)
        crop_h = math.ceil((overlap * (n_side - 1) + im_h) / n_side)
        x0s = [int((crop_w - overlap) * i) for i in range(n_side)]
        y0s = [int((crop_h - overlap) * i) for i in range(n_side)]
        for x0, y0 in product(x0s, y0s):
            boxes.append([x0, y0, min(x0 + crop_w, im_w), min(y0 + crop_h, im_h)])
            layers.append(layer)
    return boxes, layers


# ---------------------------------------------------------------------------- boxes
def batched_mask_to_box(masks: torch.Tensor) -> torch.Tensor:
    """Tight XYXY boxes (inclusive max corner) of ``... x H x W`` bool masks -> ``... x 4``
    int64; an empty mask gives ``[0, 0, 0, 0]``."""
    h, w = masks.shape[-2:]
    # max over uint8 is much faster than any() over bool on CPU.
    as_bytes = masks.view(torch.uint8)
    rows = as_bytes.amax(dim=-1) > 0  # ... x H
    cols = as_bytes.amax(dim=-2) > 0  # ... x W
    y0, y1 = _first_last(rows, h)
    x0, x1 = _first_last(cols, w)
    boxes = torch.stack([x0, y0, x1, y1], dim=-1)
    return boxes * (y0 <= y1).unsqueeze(-1)  # empty: first (h) > last (-1)


def _first_last(occupied: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last True index along the last dim of ``... x n`` (garbage if none)."""
    index = torch.arange(n, device=occupied.device)
    first = torch.where(occupied, index, n).amin(dim=-1)
    last = torch.where(occupied, index, -1).amax(dim=-1)
    return first, last


def box_xyxy_to_xywh(boxes: torch.Tensor) -> torch.Tensor:
    """``... x 4`` XYXY -> XYWH (``w = x1 - x0``, as the official records report it)."""
    return torch.cat([boxes[..., :2], boxes[..., 2:] - boxes[..., :2]], dim=-1)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """``N x 4`` XYXY -> ``N`` areas."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def is_box_near_crop_edge(
    boxes: torch.Tensor, crop_box: Sequence[int], orig_box: Sequence[int], atol: float = 20.0
) -> torch.Tensor:
    """``N x 4`` boxes in crop coordinates -> ``N`` bool: some side lies within ``atol`` px of
    a crop edge that is not also an edge of the original image (the mask was likely cut)."""
    crop = torch.as_tensor(crop_box, dtype=torch.float, device=boxes.device)
    orig = torch.as_tensor(orig_box, dtype=torch.float, device=boxes.device)
    boxes = uncrop_boxes_xyxy(boxes, crop_box).float()
    near_crop = (boxes - crop).abs() <= atol
    near_image = (boxes - orig).abs() <= atol
    return (near_crop & ~near_image).any(dim=-1)


# ---------------------------------------------------------------------------- uncrop
def uncrop_boxes_xyxy(boxes: torch.Tensor, crop_box: Sequence[int]) -> torch.Tensor:
    """``... x 4`` XYXY boxes in a crop -> original-image coordinates."""
    x0, y0 = crop_box[:2]
    return boxes + boxes.new_tensor([x0, y0, x0, y0])


def uncrop_points(points: torch.Tensor, crop_box: Sequence[int]) -> torch.Tensor:
    """``... x 2`` (x, y) points in a crop -> original-image coordinates."""
    x0, y0 = crop_box[:2]
    return points + points.new_tensor([x0, y0])


def uncrop_masks(
    masks: torch.Tensor, crop_box: Sequence[int], orig_h: int, orig_w: int
) -> torch.Tensor:
    """``B x h x w`` masks of a crop -> ``B x orig_h x orig_w``, zero outside the crop."""
    x0, y0, x1, y1 = crop_box
    if (x0, y0, x1, y1) == (0, 0, orig_w, orig_h):
        return masks
    return torch.nn.functional.pad(masks, (x0, orig_w - x1, y0, orig_h - y1), value=0)


# ---------------------------------------------------------------------------- scores
def calculate_stability_score(
    logits: torch.Tensor, mask_threshold: float, threshold_offset: float
) -> torch.Tensor:
    """IoU between the masks binarised at ``threshold ± offset`` for ``... x H x W`` logits
    -> ``...`` float (NaN when both masks are empty).

    The high-threshold mask lies inside the low-threshold one, so the IoU is a ratio of two
    pixel counts; each count is taken in turn, so only one boolean mask exists at a time.
    """
    inner = _count_above(logits, mask_threshold + threshold_offset)
    outer = _count_above(logits, mask_threshold - threshold_offset)
    return inner / outer


def _count_above(logits: torch.Tensor, threshold: float) -> torch.Tensor:
    # Summing bytes into int32 is several times faster than the default bool -> int64 sum.
    above = (logits > threshold).view(torch.uint8)
    return above.flatten(-2).sum(dim=-1, dtype=torch.int32)


# ---------------------------------------------------------------------------- NMS
def batched_nms(
    boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    """Greedy NMS per category (``torchvision.ops.batched_nms`` semantics).

    ``boxes N x 4`` XYXY, ``scores N``, ``idxs N`` categories -> kept indices (int64) by
    decreasing score, ties to the lower index. Uses torchvision when it is installed and
    works, else :func:`greedy_batched_nms`.
    """
    tv_nms = _torchvision_batched_nms()
    if tv_nms is not None:
        return tv_nms(boxes, scores, idxs, iou_threshold)
    return greedy_batched_nms(boxes, scores, idxs, iou_threshold)


def greedy_batched_nms(
    boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    """Plain-torch greedy NMS: same keep set and order as torchvision.

    Boxes are ranked by score; blocks of rows of the "overlaps too much" matrix are computed
    on the boxes' device (IoU with the same float arithmetic as torchvision, memory bounded
    by the block), and only the inherently sequential greedy pass runs on the CPU.
    """
    n = len(boxes)
    order = torch.sort(scores, descending=True, stable=True).indices
    boxes, idxs = boxes[order].float(), idxs[order]
    removed = np.zeros(n, dtype=bool)
    kept: list[int] = []
    block = max(1, _NMS_BLOCK_ELEMENTS // max(n, 1))
    for start in range(0, n, block):
        rows = slice(start, start + block)
        overlaps = pairwise_iou(boxes[rows], boxes) > iou_threshold
        overlaps &= idxs[rows, None] == idxs[None, :]
        overlaps_np = overlaps.cpu().numpy()
        for rank in range(start, min(start + block, n)):
            if not removed[rank]:
                kept.append(rank)
                # Only boxes ranked after this one are still undecided.
                removed[rank + 1 :] |= overlaps_np[rank - start, rank + 1 :]
    return order[torch.as_tensor(kept, dtype=torch.long, device=order.device)]


def pairwise_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``N x 4`` and ``M x 4`` XYXY boxes -> ``N x M`` IoU (NaN for two empty boxes)."""
    w = (torch.minimum(a[:, None, 2], b[None, :, 2]) - torch.maximum(a[:, None, 0], b[None, :, 0]))
    h = (torch.minimum(a[:, None, 3], b[None, :, 3]) - torch.maximum(a[:, None, 1], b[None, :, 1]))
    inter = w.clamp(min=0) * h.clamp(min=0)
    return inter / (box_area(a)[:, None] + box_area(b)[None, :] - inter)


@functools.cache
def _torchvision_batched_nms() -> NmsFn | None:
    """torchvision's NMS if it imports and gives the right answer on a probe, else None
    (a torchvision built for another torch imports but fails at call time)."""
    try:
        from torchvision.ops import batched_nms as tv_batched_nms

        probe = tv_batched_nms(
            torch.tensor([[0.0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]]),
            torch.tensor([0.9, 0.8, 0.7]),
            torch.zeros(3, dtype=torch.long),
            0.5,
        )
        return tv_batched_nms if probe.tolist() == [0, 2] else None
    except (ImportError, AttributeError, RuntimeError, OSError):  # absent or broken
        return None


# ---------------------------------------------------------------------------- clean-up
def remove_small_regions(
    mask: np.ndarray, area_thresh: float, mode: str
) -> tuple[np.ndarray, bool]:
    """Fill holes (``mode="holes"``) or drop islands (``"islands"``) smaller than
    ``area_thresh`` pixels in an ``H x W`` bool mask (8-connectivity).

    Returns the new mask and whether any small region was found. When every island is small
    the largest one is kept, so a mask never vanishes.
    """
    import cv2

    if mode not in ("holes", "islands"):
        raise SamkitError(f"mode must be 'holes' or 'islands', got {mode!r}")
    holes = mode == "holes"
    regions = (mask != holes).astype(np.uint8)  # the background for holes, else the mask
    _, labels, stats, _ = cv2.connectedComponentsWithStats(regions, connectivity=8)
    sizes = stats[1:, cv2.CC_STAT_AREA]  # label 0 is the complement of `regions`
    small = sizes < area_thresh
    if not small.any():
        return mask, False
    if holes:
        # The mask itself (label 0) plus the small holes.
        keep_label = np.concatenate([[True], small])
    else:
        keep_label = np.concatenate([[False], ~small])
        if not keep_label.any():
            keep_label[int(np.argmax(sizes)) + 1] = True
    return keep_label[labels], True
