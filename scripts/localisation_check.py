"""Has a training run learned to localise prompts yet? A quick look at a checkpoint.

    python scripts/localisation_check.py runs/samkit-tiny/checkpoint.pt [--data DIR] [--limit 8]

For the first ``--limit`` objects of a folder dataset (``images/`` + ``masks/``, default
GrabCut), prompts the checkpoint's model with the object's box and with a point at its mask's
centroid, and prints per object the box / point IoU and the mean logit inside vs outside the
object (for the point prompt's top-ranked mask). A model still on the "empty mask" plateau
shows the same mean inside and outside; one that localises shows inside > outside well before
its IoUs leave 0. Accepts a training ``checkpoint.pt`` or any weights file ``build_sam`` loads.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from samkit.build import build_sam, load_into, load_state_dict
from samkit.errors import SamkitError
from samkit.images import load_image
from samkit.predictor import SamPredictor

GRABCUT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "grabcut"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--model", default="samkit-tiny")
    parser.add_argument("--data", type=Path, default=GRABCUT)
    parser.add_argument("--limit", type=int, default=8)
    args = parser.parse_args()

    sam = build_sam(args.model)
    load_into(sam, load_state_dict(args.checkpoint), args.model, str(args.checkpoint))
    predictor = SamPredictor(sam.eval())

    box_ious, point_ious = [], []
    for image_path in sorted((args.data / "images").iterdir())[: args.limit]:
        mask = load_image(args.data / "masks" / f"{image_path.stem}.png")
        gt = (mask[..., 0] if mask.ndim == 3 else mask) > 128
        ys, xs = np.nonzero(gt)
        predictor.set_image(load_image(image_path))
        box = np.array([xs.min(), ys.min(), xs.max(), ys.max()])
        logits, _, _ = predictor.predict(box=box, multimask_output=False, return_logits=True)
        box_ious.append(iou(logits[0] > 0, gt))
        point = np.array([[xs.mean(), ys.mean()]])
        logits, scores, _ = predictor.predict(point, np.array([1]), return_logits=True)
        best = logits[int(scores.argmax())]
        point_ious.append(iou(best > 0, gt))
        print(f"{image_path.name}: box IoU {box_ious[-1]:.2f}, point IoU {point_ious[-1]:.2f}, "
              f"mean logit inside {best[gt].mean():.2f} / outside {best[~gt].mean():.2f}")
    print(f"mean box IoU {np.mean(box_ious):.3f}, mean point IoU {np.mean(point_ious):.3f}")


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    return float((pred & gt).sum() / max((pred | gt).sum(), 1))


if __name__ == "__main__":
    try:
        main()
    except SamkitError as err:
        raise SystemExit(f"localisation_check: error: {err}") from None
