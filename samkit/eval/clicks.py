"""Simulated clicks and mask IoU for interactive evaluation (SAM §7.1 and App. D.1, which
follow RITM's protocol: Sofiiuk et al., "Reviving Iterative Training with Mask Guidance for
Interactive Segmentation", 2022).

Each click goes to the pixel farthest from the boundary of an error region: the false
negatives (ground truth the prediction misses: a positive click) or the false positives
(prediction outside the ground truth: a negative click), whichever reaches deeper, i.e. has
the larger maximum distance to its boundary. With an empty prediction the whole object is
the false-negative region, so the first click lands at the object's "centre" (its point of
maximum distance to the boundary). Distances come from an exact Euclidean distance
transform of the region padded with one pixel of background, so the image border counts as
a boundary. Ties go to the first pixel in row-major order, and a pixel is never clicked
twice: the run is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class Click:
    x: int
    y: int
    positive: bool


def mask_iou(pred: np.ndarray, gt: np.ndarray, ignore: np.ndarray | None) -> float:
    """IoU of two ``H x W`` bool masks over the pixels not in ``ignore`` (1.0 if both are
    empty there)."""
    if ignore is not None:
        valid = ~ignore
        pred, gt = pred & valid, gt & valid
    union = np.count_nonzero(pred | gt)
    return 1.0 if union == 0 else float(np.count_nonzero(pred & gt) / union)


def boundary_distance(region: np.ndarray) -> np.ndarray:
    """Euclidean distance of each pixel of ``region`` to the nearest pixel outside it (the
    image border counts as outside); 0 outside the region."""
    padded = np.pad(region.astype(np.uint8), 1)
    return cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]


def next_click(
    pred: np.ndarray,
    gt: np.ndarray,
    ignore: np.ndarray | None = None,
    clicked: np.ndarray | None = None,
) -> Click | None:
    """The next simulated click for prediction ``pred`` of object ``gt`` (``None`` when no
    error is left). ``clicked`` marks pixels clicked before, which are never chosen again."""
    fn, fp = gt & ~pred, ~gt & pred
    if ignore is not None:
        fn, fp = fn & ~ignore, fp & ~ignore
    fn_dist, fp_dist = boundary_distance(fn), boundary_distance(fp)
    if clicked is not None:
        fn_dist[clicked] = 0
        fp_dist[clicked] = 0
    fn_max, fp_max = float(fn_dist.max()), float(fp_dist.max())
    if max(fn_max, fp_max) == 0:
        return None
    positive = fn_max > fp_max
    dist = fn_dist if positive else fp_dist
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)  # first maximum, row-major
    return Click(int(x), int(y), positive)


def first_click(gt: np.ndarray, ignore: np.ndarray | None = None) -> Click | None:
    """The first click: the point of ``gt`` farthest from its boundary (always positive)."""
    return next_click(np.zeros_like(gt), gt, ignore)


def mask_box(mask: np.ndarray) -> np.ndarray:
    """Tight XYXY box of a non-empty ``H x W`` mask, max corner exclusive (COCO style)."""
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)
