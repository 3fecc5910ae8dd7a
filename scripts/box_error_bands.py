"""Where a model's box-prompt errors lie: the share of wrong pixels by distance to the true
boundary, and the box mIoU if every error within 8 px of it were fixed; also the IoU the
ground truth keeps through the decoder's 128 x 128 low-res frame (down-sampled and back).

    python scripts/box_error_bands.py [--data ../shared/data/grabcut] [--checkpoint FILE]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
import torch

from samkit.build import build_sam
from samkit.eval.clicks import mask_box, mask_iou
from samkit.eval.datasets import open_dataset
from samkit.predictor import SamPredictor

BANDS = (4, 8, 16, 32)


def distance_to_boundary(gt: np.ndarray) -> np.ndarray:
    inside = cv2.distanceTransform(gt.astype(np.uint8), cv2.DIST_L2, 3)
    outside = cv2.distanceTransform((~gt).astype(np.uint8), cv2.DIST_L2, 3)
    return np.where(gt, inside, outside)


def through_low_res(gt: np.ndarray, grid: int = 128) -> np.ndarray:
    h, w = gt.shape
    scale = grid / max(h, w)
    small = cv2.resize(gt.astype(np.float32), (max(1, round(w * scale)), max(1, round(h * scale))),
                       interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR) > 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/grabcut"))
    parser.add_argument("--model", default="samkit-tiny")
    parser.add_argument("--checkpoint", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(2)
    predictor = SamPredictor(build_sam(args.model, args.checkpoint))
    errors = np.zeros(len(BANDS) + 1)
    ious, fixed_ious, low_res_ious = [], [], []
    for item in open_dataset(args.data).items:
        sample = item.load()
        predictor.set_image(sample.image)
        for obj in sample.objects:
            gt, ignore = obj.mask, obj.ignore
            masks, _, _ = predictor.predict(box=mask_box(gt), multimask_output=False)
            pred = masks[0]
            dist = distance_to_boundary(gt)
            wrong = (pred ^ gt) if ignore is None else (pred ^ gt) & ~ignore
            edges = (0, *BANDS, np.inf)
            for i in range(len(edges) - 1):
                errors[i] += np.count_nonzero(wrong & (dist > edges[i]) & (dist <= edges[i + 1]))
            ious.append(mask_iou(pred, gt, ignore))
            fixed_ious.append(mask_iou(np.where(dist <= 8, gt, pred), gt, ignore))
            low_res_ious.append(mask_iou(through_low_res(gt), gt, ignore))
    shares = errors / errors.sum()
    labels = [f"<= {b} px" for b in BANDS] + [f"> {BANDS[-1]} px"]
    print(f"box mIoU {np.mean(ious):.3f}; with the errors within 8 px of the boundary fixed "
          f"{np.mean(fixed_ious):.3f}; ground truth through the 128 x 128 frame "
          f"{np.mean(low_res_ious):.3f}")
    print("share of wrong pixels by distance to the boundary: "
          + ", ".join(f"{label} {share:.3f}" for label, share in zip(labels, shares)))


if __name__ == "__main__":
    main()
