"""Prompts as users give them: points, labels and a box in original-image pixels, parsed from
command-line text and checked against the image, with one-line errors.

:class:`Prompts` is what ``samkit segment`` and the annotation app's API take; the predictor
receives its arrays (``points K x 2``, ``labels K``, ``box 4``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from samkit.errors import SamkitError

POINT_SYNTAX = "x,y[,label]"
BOX_SYNTAX = "x0,y0,x1,y1"


@dataclass(frozen=True)
class Prompts:
    """Prompts in original-image pixels: ``points K x 2`` XY with ``labels K`` (1 foreground,
    0 background), and at most one XYXY ``box``."""

    points: np.ndarray
    labels: np.ndarray
    box: np.ndarray | None

    def to_json(self) -> dict[str, Any]:
        return {
            "points": self.points.tolist(),
            "labels": self.labels.tolist(),
            "box": None if self.box is None else self.box.tolist(),
        }


def parse_prompts(point_texts: list[str], box_texts: list[str]) -> Prompts:
    """Turn ``--point`` / ``--box`` strings into a :class:`Prompts`; at least one is needed."""
    if not point_texts and not box_texts:
        raise SamkitError(
            f"no prompt given: pass --point {POINT_SYNTAX} (repeatable) and/or --box {BOX_SYNTAX}"
        )
    if len(box_texts) > 1:
        raise SamkitError("only one --box per run (SAM takes a single box per prompt)")
    parsed = [parse_point(text) for text in point_texts]
    points = np.array([p[:2] for p in parsed], dtype=np.float64).reshape(-1, 2)
    labels = np.array([p[2] for p in parsed], dtype=np.int64)
    box = parse_box(box_texts[0]) if box_texts else None
    return Prompts(points, labels, box)


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
    """Multimask output for ambiguous prompts, as the paper recommends: one point alone, or one
    box without points. More prompts pin the object down, so one mask is better."""
    if single:
        return False
    if prompts.box is None:
        return len(prompts.points) == 1
    return len(prompts.points) == 0
