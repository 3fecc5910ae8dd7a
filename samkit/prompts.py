"""Prompts as users give them: points, labels and boxes in original-image pixels, parsed from
command-line text and checked, with one-line errors: the one home of prompt validation.

:class:`Prompts` is what ``samkit segment`` and the annotation app's API take;
:func:`check_points` and :func:`check_boxes` are the array rules of every predictor
(:class:`~samkit.predictor.SamPredictor`, the ONNX predictor), :func:`check_prompts_fit`
the rule that prompts lie on the image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from samkit.errors import SamkitError

POINT_SYNTAX = "x,y[,label]"
BOX_SYNTAX = "x0,y0,x1,y1"
POINT_LABELS = (-1, 0, 1)  # padding, background, foreground (samkit.modeling.prompt_encoder)
# Points per prompt set. The decoder's memory grows with the square of its tokens (10,000
# points asked for 25 GB); interactive sessions use tens of clicks.
MAX_POINTS = 256


@dataclass(frozen=True)
class Prompts:
    """Prompts in original-image pixels: ``points K x 2`` XY with ``labels K`` (1 foreground,
    0 background), at most one XYXY ``box``, and an optional ``text`` phrase (for a model with
    a text slot, docs/text.md)."""

    points: np.ndarray
    labels: np.ndarray
    box: np.ndarray | None
    text: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "points": self.points.tolist(),
            "labels": self.labels.tolist(),
            "box": None if self.box is None else self.box.tolist(),
        }
        if self.text is not None:
            out["text"] = self.text
        return out


def parse_prompts(point_texts: list[str], box_texts: list[str],
                  text: str | None = None) -> Prompts:
    """Turn ``--point`` / ``--box`` strings (and a checked ``--text`` phrase) into a
    :class:`Prompts`; at least one prompt is needed."""
    if not point_texts and not box_texts and text is None:
        raise SamkitError(
            f"no prompt given: pass --point {POINT_SYNTAX} (repeatable) and/or --box {BOX_SYNTAX}"
        )
    if len(box_texts) > 1:
        raise SamkitError("only one --box per run (SAM takes a single box per prompt)")
    parsed = [parse_point(text) for text in point_texts]
    points = np.array([p[:2] for p in parsed], dtype=np.float64).reshape(-1, 2)
    labels = np.array([p[2] for p in parsed], dtype=np.int64)
    box = parse_box(box_texts[0]) if box_texts else None
    return Prompts(points, labels, box, text)


def parse_point(text: str) -> tuple[float, float, int]:
    """``"x,y"`` or ``"x,y,label"`` -> ``(x, y, label)``; the label defaults to 1."""
    parts = text.split(",")
    if len(parts) not in (2, 3):
        raise SamkitError(f"bad --point {text!r}: expected {POINT_SYNTAX}, e.g. 120,80 or 120,80,0")
    x, y = (_number(part, "--point", text) for part in parts[:2])
    label = 1
    if len(parts) == 3:
        if parts[2].strip() not in ("0", "1"):
            raise SamkitError(
                f"bad --point {text!r}: label must be 1 (foreground) or 0 (background)"
            )
        label = int(parts[2])
    return x, y, label


def parse_box(text: str) -> np.ndarray:
    """``"x0,y0,x1,y1"`` -> a length-4 float array with ``x1 > x0`` and ``y1 > y0``."""
    parts = text.split(",")
    if len(parts) != 4:
        raise SamkitError(f"bad --box {text!r}: expected {BOX_SYNTAX}, e.g. 10,20,200,180")
    x0, y0, x1, y1 = (_number(part, "--box", text) for part in parts)
    if x1 <= x0 or y1 <= y0:
        raise SamkitError(
            f"bad --box {text!r}: need x1 > x0 and y1 > y0 (top-left corner first)"
        )
    return np.array([x0, y0, x1, y1], dtype=np.float64)


def _number(part: str, option: str, text: str) -> float:
    try:
        value = float(part)
    except ValueError:
        raise SamkitError(f"bad {option} {text!r}: {part.strip()!r} is not a number") from None
    if not math.isfinite(value):
        raise SamkitError(f"bad {option} {text!r}: coordinates must be finite")
    return value


def check_prompts_fit(prompts: Prompts, *, height: int, width: int) -> None:
    """Points must lie on a pixel of the image and the box inside it (its edges may touch
    the border, hence ``<= width``)."""
    for (x, y), label in zip(prompts.points, prompts.labels, strict=True):
        if not (0 <= x < width and 0 <= y < height):
            raise SamkitError(
                f"point {_fmt(x)},{_fmt(y)},{label} is outside the {width}x{height} image "
                f"(x must be in 0..{width - 1}, y in 0..{height - 1})"
            )
    if prompts.box is not None:
        x0, y0, x1, y1 = prompts.box
        if not (0 <= x0 and 0 <= y0 and x1 <= width and y1 <= height):
            raise SamkitError(
                f"box {','.join(_fmt(v) for v in prompts.box)} is not inside the "
                f"{width}x{height} image"
            )


def _fmt(value: float) -> str:
    return f"{value:g}"


def wants_multimask(prompts: Prompts, *, single: bool) -> bool:
    """Multimask output for ambiguous prompts, as the paper recommends: one point alone, one
    box without points, or text alone ("a wheel" of four). More prompts pin the object down,
    so one mask is better."""
    if single:
        return False
    if prompts.box is None:
        return len(prompts.points) == 1 or (len(prompts.points) == 0 and prompts.text is not None)
    return len(prompts.points) == 0


def check_points(coords: Any, labels: Any, *, batched: bool,
                 max_points: int = MAX_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """Point prompts as arrays: ``B x N x 2`` XY with ``B x N`` labels (``batched``), or
    ``N x 2`` with ``N``, and ``N <= max_points``. Returns float32 coordinates and int64
    labels."""
    coords, labels = as_prompt_array(coords), as_prompt_array(labels)
    shape = "B x N x 2" if batched else "N x 2"
    if coords.ndim != (3 if batched else 2) or coords.shape[-1] != 2:
        raise SamkitError(f"point coordinates must be {shape}, got {tuple(coords.shape)}")
    if coords.shape[-2] > max_points:
        raise SamkitError(f"at most {max_points} points per prompt, got {coords.shape[-2]}")
    if labels.shape != coords.shape[:-1]:
        raise SamkitError(f"point labels must be {shape[:-4]} = {tuple(coords.shape[:-1])}, "
                          f"got {tuple(labels.shape)}")
    if not np.issubdtype(coords.dtype, np.number) or not np.isfinite(coords).all():
        raise SamkitError("point coordinates must be finite numbers")
    if not np.isin(labels, POINT_LABELS).all():
        raise SamkitError("point labels must be 1 (foreground), 0 (background) or -1 (padding)")
    return coords.astype(np.float32), labels.astype(np.int64)


def check_boxes(boxes: Any) -> np.ndarray:
    """Box prompts as a ``B x 4`` XYXY array (a single box ``4`` is ``1 x 4``); float32."""
    boxes = as_prompt_array(boxes)
    if boxes.ndim == 1:
        boxes = boxes[None]
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise SamkitError(f"boxes must be B x 4 (x0, y0, x1, y1), got {tuple(boxes.shape)}")
    if not np.issubdtype(boxes.dtype, np.number) or not np.isfinite(boxes).all():
        raise SamkitError("box coordinates must be finite numbers")
    if (boxes[:, 2] < boxes[:, 0]).any() or (boxes[:, 3] < boxes[:, 1]).any():
        raise SamkitError("a box must have x1 >= x0 and y1 >= y0 (XYXY order)")
    return boxes.astype(np.float32)


def as_prompt_array(values: Any) -> np.ndarray:
    """A numpy array of prompt ``values`` (numpy, nested lists, or a torch tensor on any
    device); anything that is not one numeric array is a one-line error."""
    if hasattr(values, "detach"):  # a torch tensor: prompts are small, the copy is cheap
        values = values.detach().cpu().numpy()
    try:
        return np.asarray(values)
    except (TypeError, ValueError) as err:
        raise SamkitError(f"prompt arrays must be numeric arrays ({err})") from None
