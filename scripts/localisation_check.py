"""Has a training run learned to localise prompts yet? A quick look at a checkpoint.

    python scripts/localisation_check.py runs/samkit-tiny/checkpoint.pt [--data DIR] [--limit 8]

For the objects of the first ``--limit`` images of a dataset ``samkit eval points`` reads
(default GrabCut; ignore bands count as in the evaluation), prompts the checkpoint's model with the object's box and with a point at its mask's
centroid, and prints per object the box / point IoU and the mean logit inside vs outside the
object (for the point prompt's top-ranked mask). A model still on the "empty mask" plateau
shows the same mean inside and outside; one that localises shows inside > outside well before
its IoUs leave 0. "Same mask elsewhere" is the IoU between that mask and the top-ranked mask
for a click on the background pixel farthest from the centroid: near 1, the model answers a
click with the same region wherever it lands (it does not follow the point). "Content-free"
repeats the box and the point prompt on the image's spatial-mean embedding (no content, the
positional encoding only: what ``content_dropout`` trains on) and reports how far the
top-ranked mask's centroid lands from the box centre / the click, in image pixels ("empty"
when the mask is). Accepts a training ``checkpoint.pt`` (the model is built from the run's
``config.yaml`` beside it, so grown models load too) or any weights file ``build_sam`` loads.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from samkit.build import build_sam, build_sam_from_config, load_into, load_state_dict
from samkit.errors import SamkitError
from samkit.eval.clicks import mask_iou
from samkit.eval.datasets import open_dataset
from samkit.predictor import EmbeddedImage, SamPredictor
from samkit.train.config import load_config

GRABCUT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "grabcut"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--model", default="samkit-tiny")
    parser.add_argument("--data", type=Path, default=GRABCUT)
    parser.add_argument("--limit", type=int, default=8)
    args = parser.parse_args()

    run_config = args.checkpoint.parent / "config.yaml"
    if args.checkpoint.suffix == ".pt" and run_config.is_file():  # a run's own model
        sam = build_sam_from_config(load_config(run_config).model_config())
        load_into(sam, load_state_dict(args.checkpoint), args.model, str(args.checkpoint))
    else:  # the architecture the file records
        sam = build_sam(args.model, args.checkpoint)
    predictor = SamPredictor(sam.eval())

    box_ious, point_ious, same_ious = [], [], []
    box_offsets, point_offsets = [], []
    for item in open_dataset(args.data, args.limit).items:
        sample = item.load()
        predictor.set_image(sample.image)
        embedded = predictor.get_embedding()
        content_free = EmbeddedImage(
            embedded.features.mean((-2, -1), keepdim=True).expand_as(embedded.features)
            .contiguous(), embedded.original_size, embedded.input_size)
        for index, obj in enumerate(sample.objects):
            ys, xs = np.nonzero(obj.mask)
            if len(xs) == 0:
                continue
            box = np.array([xs.min(), ys.min(), xs.max(), ys.max()])
            logits, _, _ = predictor.predict(box=box, multimask_output=False,
                                             return_logits=True)
            box_ious.append(mask_iou(logits[0] > 0, obj.mask, obj.ignore))
            point = np.array([[xs.mean(), ys.mean()]])
            logits, scores, _ = predictor.predict(point, np.array([1]), return_logits=True)
            best = logits[int(scores.argmax())]
            point_ious.append(mask_iou(best > 0, obj.mask, obj.ignore))
            by, bx = np.nonzero(~obj.mask)
            far = int(np.argmax((bx - point[0, 0]) ** 2 + (by - point[0, 1]) ** 2))
            logits, scores, _ = predictor.predict(np.array([[bx[far], by[far]]]), np.array([1]),
                                                  return_logits=True)
            same_ious.append(mask_iou(logits[int(scores.argmax())] > 0, best > 0, None))
            predictor.set_embedding(content_free)
            box_mask = predictor.predict(box=box, multimask_output=False)[0][0]
            masks, scores, _ = predictor.predict(point, np.array([1]))
            predictor.set_embedding(embedded)
            box_offsets.append(centroid_offset(box_mask, (box[:2] + box[2:]) / 2))
            point_offsets.append(centroid_offset(masks[int(scores.argmax())], point[0]))
            print(f"{sample.name}#{index}: box IoU {box_ious[-1]:.2f}, point IoU "
                  f"{point_ious[-1]:.2f}, mean logit inside {best[obj.mask].mean():.2f} / "
                  f"outside {best[~obj.mask].mean():.2f}, same mask elsewhere "
                  f"{same_ious[-1]:.2f}, content-free offset box {show(box_offsets[-1])} / "
                  f"point {show(point_offsets[-1])}")
    if not box_ious:
        raise SamkitError(f"no objects in {args.data}")
    print(f"mean box IoU {np.mean(box_ious):.3f}, mean point IoU {np.mean(point_ious):.3f}, "
          f"mean same mask elsewhere {np.mean(same_ious):.3f}")
    for kind, offsets in (("box", box_offsets), ("point", point_offsets)):
        landed = [d for d in offsets if d is not None]
        median = f"{np.median(landed):.0f} px" if landed else "-"
        print(f"content-free {kind}: median centroid offset {median}, "
              f"empty {len(offsets) - len(landed)} of {len(offsets)}")


def centroid_offset(mask: np.ndarray, target: np.ndarray) -> float | None:
    """Distance in pixels from ``target`` (x, y) to the mask's centroid; None if empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return float(np.hypot(xs.mean() - target[0], ys.mean() - target[1]))


def show(offset: float | None) -> str:
    return "empty" if offset is None else f"{offset:.0f} px"


if __name__ == "__main__":
    try:
        main()
    except SamkitError as err:
        raise SystemExit(f"localisation_check: error: {err}") from None
