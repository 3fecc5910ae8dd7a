"""Measure segment-everything's quality filters for a model on training images.

Runs the automatic mask generator with its filters off on images of a mask folder (a
training source, never an evaluation set), and scores every (predicted IoU, stability)
threshold pair of a grid: a kept mask is a hit when it overlaps a ground-truth object at IoU
>= 0.5; precision is the hits' share of the kept masks, recall the share of objects hit by a
kept mask. Prints the table and the pair with the best F1 (what a registry entry's
``everything_filters`` takes). Training folders annotate only some objects, so precision
is a lower bound: the choice favours filters that keep annotated-object-like masks.

    python scripts/everything_thresholds.py ../shared/data/train/coco128_seg --limit 24
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from samkit.automatic import AutomaticMaskGenerator
from samkit.build import build_sam
from samkit.eval.datasets import open_dataset

IOU_GRID = (0.0, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.88)
STABILITY_GRID = (0.0, 0.7, 0.8, 0.85, 0.9, 0.95)
HIT_IOU = 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, nargs="+", help="mask folders (images/ + masks/)")
    parser.add_argument("--model", default="samkit-tiny")
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--limit", type=int, default=12, help="images per folder")
    parser.add_argument("--points-per-side", type=int, default=32)
    args = parser.parse_args()

    generator = AutomaticMaskGenerator(build_sam(args.model, args.checkpoint).eval(),
                                       points_per_side=args.points_per_side,
                                       pred_iou_thresh=0.0, stability_score_thresh=0.0)
    scores, best_gt, objects, images = [], [], 0, 0  # per mask: (iou, stability), best GT IoU
    hits_of: list[np.ndarray] = []  # per mask: which objects (global index) it hits
    for folder in args.data:
        for item in open_dataset(folder, args.limit).items:
            sample = item.load()
            images += 1
            gts = np.stack([o.mask for o in sample.objects]) if sample.objects else None
            for record in generator.generate(sample.image):
                mask = record["segmentation"]
                scores.append((record["predicted_iou"], record["stability_score"]))
                if gts is None:
                    best_gt.append(0.0)
                    hits_of.append(np.zeros(0, int))
                    continue
                inter = (gts & mask).sum((1, 2))
                union = (gts | mask).sum((1, 2))
                ious = inter / np.maximum(union, 1)
                best_gt.append(float(ious.max()))
                hits_of.append(objects + np.nonzero(ious >= HIT_IOU)[0])
            objects += 0 if gts is None else len(gts)
    values = np.nan_to_num(np.array(scores, dtype=float), nan=0.0)
    hit = np.array(best_gt) >= HIT_IOU
    print(f"{images} images, {len(values)} masks, {objects} objects; a mask at IoU >= {HIT_IOU} "
          "with an object is a hit")
    print("pred_iou  stability  kept/img  precision  recall  F1")
    best = None
    for iou_t in IOU_GRID:
        for stab_t in STABILITY_GRID:
            kept = (values[:, 0] > iou_t) & (values[:, 1] >= stab_t)
            precision = hit[kept].mean() if kept.any() else 0.0
            found = {int(o) for k in np.nonzero(kept)[0] for o in hits_of[k]}
            recall = len(found) / max(objects, 1)
            f1 = 2 * precision * recall / max(precision + recall, 1e-9)
            print(f"{iou_t:8.2f}  {stab_t:9.2f}  {kept.sum() / images:8.1f}  {precision:9.3f}"
                  f"  {recall:6.3f}  {f1:.3f}")
            if best is None or f1 > best[0]:
                best = (f1, iou_t, stab_t)
    assert best is not None
    print(f"best F1 {best[0]:.3f}: pred_iou_thresh {best[1]}, stability_score_thresh {best[2]}")


if __name__ == "__main__":
    main()
