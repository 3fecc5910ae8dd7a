"""Drawing masks and prompts over an image, and writing PNGs atomically.

Shared by ``samkit segment``, ``samkit everything`` and the annotation app, so the two public
functions keep a fixed API: :func:`draw_overlay` and :func:`save_png`.
"""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from samkit.errors import SamkitError
from samkit.io import write_bytes_atomic

FOREGROUND_RGB = (0, 220, 0)
BACKGROUND_RGB = (230, 0, 0)
BOX_RGB = (0, 255, 0)
RIM_RGB = (255, 255, 255)
BANNER_RGB = (176, 0, 32)
UNTRAINED_BANNER = "UNTRAINED MODEL: random weights, masks mean nothing"
_GOLDEN_RATIO_CONJUGATE = 0.618033988749895
_FIRST_HUE = 0.58  # blue, as a fraction of the colour wheel


def palette(n: int, seed: int = 0) -> np.ndarray:
    """``n x 3`` uint8 RGB colours, distinct and deterministic for a given ``seed``.

    Hues step by the golden ratio, which keeps any run of consecutive colours far apart on the
    colour wheel however many masks there are; ``seed`` rotates the whole wheel. With seed 0
    the first colour is blue, so a lone mask never looks like a red background point.
    """
    if n == 0:  # OpenCV refuses an empty image: an image with no masks gets no colours
        return np.zeros((0, 3), dtype=np.uint8)
    hues = (_FIRST_HUE + (seed + np.arange(n)) * _GOLDEN_RATIO_CONJUGATE) % 1.0
    hsv = np.stack(
        [np.round(hues * 179), np.full(n, 200), np.full(n, 240)], axis=-1
    ).astype(np.uint8)  # OpenCV's 8-bit HSV: hue 0..179, saturation and value 0..255
    return cv2.cvtColor(hsv[None], cv2.COLOR_HSV2RGB)[0]


def draw_overlay(
    image: np.ndarray,
    masks: np.ndarray,
    *,
    points: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    boxes: np.ndarray | None = None,
    alpha: float = 0.5,
    seed: int = 0,
    banner: str | None = None,
) -> np.ndarray:
    """Return a copy of ``image`` with masks, points and boxes drawn on it.

    Args:
        image: ``H x W x 3`` uint8 RGB.
        masks: ``N x H x W`` (bool, or anything where non-zero means inside); mask ``i`` gets
            colour ``palette(N, seed)[i]``, blended with ``alpha`` and outlined opaquely.
        points: ``K x 2`` XY pixel coordinates.
        labels: ``K`` point labels, 1 foreground (green), 0 background (red); other values
            (the predictor's -1 padding) are not drawn. Default: all foreground.
        boxes: ``B x 4`` XYXY.
        alpha: opacity of the mask fill, 0..1.
        seed: rotates the palette, e.g. to tell two overlays of one image apart.
        banner: a line of text written across the top in white on red, e.g. to mark masks of
            an untrained model (:data:`UNTRAINED_BANNER`).

    Returns ``H x W x 3`` uint8.
    """
    image, masks = _check_image_and_masks(image, masks)
    if not 0.0 <= alpha <= 1.0:
        raise SamkitError(f"alpha must be in 0..1, got {alpha}")
    out = image.copy()
    colours = palette(len(masks), seed)
    thickness = _line_thickness(out.shape[:2])
    # Largest first, so a small mask lying on a large one stays visible.
    order = np.argsort([-int(m.sum()) for m in masks], kind="stable")
    for i in order:
        _fill(out, masks[i], colours[i], alpha)
    # Outlines after every fill, so no later fill blurs an earlier outline.
    for i in order:
        _outline(out, masks[i], colours[i], thickness)
    if boxes is not None:
        _draw_boxes(out, boxes, thickness)
    if points is not None:
        _draw_points(out, points, labels, thickness)
    if banner:
        _draw_banner(out, banner)
    return out


def _draw_banner(out: np.ndarray, text: str) -> None:
    """``text`` on a red strip across the top, scaled to fit the image's width."""
    font, thickness = cv2.FONT_HERSHEY_SIMPLEX, 1
    (width, height), baseline = cv2.getTextSize(text, font, 1.0, thickness)
    scale = min(1.0, 0.95 * out.shape[1] / width)
    strip = min(out.shape[0], int((height + baseline) * scale) + 8)
    out[:strip] = BANNER_RGB
    cv2.putText(out, text, (4, strip - int(baseline * scale) - 4), font, scale,
                (255, 255, 255), thickness, cv2.LINE_AA)


def save_png(path: str | Path, array: np.ndarray) -> Path:
    """Write ``array`` as a PNG atomically (see :func:`write_bytes_atomic`).

    Accepts ``H x W`` bool (written 0 / 255), ``H x W`` uint8 (gray) or ``H x W x 3`` uint8
    (RGB).
    """
    buffer = io.BytesIO()
    Image.fromarray(_png_ready(array)).save(buffer, format="PNG")
    return write_bytes_atomic(path, buffer.getvalue())


# --- helpers ------------------------------------------------------------------------------


def _check_image_and_masks(image: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise SamkitError(f"overlay image must be H x W x 3 uint8, got {image.shape} {image.dtype}")
    masks = np.asarray(masks)
    if masks.ndim != 3 or masks.shape[1:] != image.shape[:2]:
        raise SamkitError(
            f"masks must be N x {image.shape[0]} x {image.shape[1]}, got {masks.shape}"
        )
    return np.ascontiguousarray(image), masks.astype(bool, copy=False)


def _line_thickness(size: tuple[int, int]) -> int:
    """About 1 px per 500 px of the shorter side: visible on large photos, not clumsy on small."""
    return max(1, round(min(size) / 500))


def _fill(out: np.ndarray, mask: np.ndarray, colour: np.ndarray, alpha: float) -> None:
    blended = out[mask].astype(np.float32) * (1.0 - alpha) + colour.astype(np.float32) * alpha
    out[mask] = np.round(blended).astype(np.uint8)


def _outline(out: np.ndarray, mask: np.ndarray, colour: np.ndarray, thickness: int) -> None:
    # RETR_LIST also outlines holes, which are part of the mask's shape.
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, tuple(int(c) for c in colour), thickness)


def _draw_boxes(out: np.ndarray, boxes: np.ndarray, thickness: int) -> None:
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    for x0, y0, x1, y1 in np.round(boxes).astype(int):
        cv2.rectangle(out, (x0, y0), (x1, y1), BOX_RGB, thickness + 1, cv2.LINE_AA)


def _draw_points(
    out: np.ndarray, points: np.ndarray, labels: np.ndarray | None, thickness: int
) -> None:
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    labels = np.ones(len(points), int) if labels is None else np.asarray(labels).reshape(-1)
    if len(labels) != len(points):
        raise SamkitError(f"got {len(points)} points but {len(labels)} labels")
    radius = max(3, round(min(out.shape[:2]) / 100))
    for (x, y), label in zip(np.round(points).astype(int), labels, strict=True):
        if label not in (0, 1):
            continue
        fill = FOREGROUND_RGB if label == 1 else BACKGROUND_RGB
        cv2.circle(out, (x, y), radius + thickness + 1, RIM_RGB, -1, cv2.LINE_AA)
        cv2.circle(out, (x, y), radius, fill, -1, cv2.LINE_AA)


def _png_ready(array: np.ndarray) -> np.ndarray:
    """``array`` as something PIL writes as an 8-bit gray or RGB PNG."""
    array = np.asarray(array)
    if array.ndim == 2 and array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if array.dtype == np.uint8 and (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
        return np.ascontiguousarray(array)
    raise SamkitError(
        f"save_png takes H x W bool/uint8 or H x W x 3 uint8, got {array.shape} {array.dtype}"
    )
