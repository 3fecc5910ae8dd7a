"""Segment everything: samkit's ``AutomaticMaskGenerator`` vs the official
``SamAutomaticMaskGenerator``, same random full-size ``vit_b`` weights, same photo.

Each generator runs in its own subprocess (fair peak RSS, read from ``VmHWM``); the time is
end to end (``generate``, image encoder included), median over ``--reps``. The official code
needs torchvision only for ``batched_nms``; as in the tests it gets the stub from
``tests/official.py``, whose NMS is a plain Python loop. Mask-set parity: count, and the IoU
of masks matched in order.

    python benchmarks/automatic.py --points-per-side 16 --reps 1

Random weights rate every mask poorly (nothing passes the default filters) and predict
near-identical image-wide masks (box NMS keeps one), so to time the mask post-processing too,
turn both off: ``--pred-iou-thresh 0 --stability-score-thresh 0 --box-nms-thresh 1``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGE = ROOT.parent / "shared/data/coco_tiny_val2017/images/000000005001.jpg"
VIT_B = {"encoder_depth": 12, "embed_dim": 768, "num_heads": 12, "global_attn": (2, 5, 8, 11)}


def load_photo(path: Path, long_side: int = 1024) -> np.ndarray:
    """The photo as RGB uint8, resized (bilinear) so its long side is ``long_side``."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        scale = long_side / max(im.size)
        size = (round(im.width * scale), round(im.height * scale))
        return np.asarray(im.resize(size, Image.BILINEAR))


def make_weights(path: Path, seed: int = 0) -> None:
    """Random official ``vit_b`` weights, saved for both workers to load."""
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from official import official_sam

    torch.manual_seed(seed)
    torch.save(official_sam(**VIT_B).state_dict(), path)


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(impl: str, weights: Path, image_path: Path, knobs: dict, reps: int, out: Path) -> None:
    """Build one implementation, time ``generate``, write times, peak RSS and COCO RLEs."""
    import torch
    from pycocotools import mask as mask_utils

    image = load_photo(image_path)
    state_dict = torch.load(weights, weights_only=True)
    if impl == "official":
        sys.path.insert(0, str(ROOT / "tests"))
        from official import official_package, official_sam

        model = official_sam(**VIT_B)
        generator_cls = official_package().SamAutomaticMaskGenerator
    else:
        from samkit.automatic import AutomaticMaskGenerator
        from samkit.build import build_sam_from_config
        from samkit.registry import MODEL_CONFIGS

        model = build_sam_from_config(MODEL_CONFIGS["vit_b"])
        generator_cls = AutomaticMaskGenerator
    model.load_state_dict(state_dict, strict=True)
    del state_dict
    generator = generator_cls(model, **knobs)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        records = generator.generate(image)
        times.append(time.perf_counter() - start)
    rles = [
        mask_utils.encode(np.asfortranarray(r["segmentation"].astype(np.uint8))) for r in records
    ]
    result = {
        "times": times,
        "peak_rss_mib": peak_rss_mib(),
        "rles": [{"size": r["size"], "counts": r["counts"].decode()} for r in rles],
        "predicted_iou": [r["predicted_iou"] for r in records],
    }
    out.write_text(json.dumps(result))


def run_worker(impl: str, args: argparse.Namespace, weights: Path, tmp: Path) -> dict:
    out = tmp / f"{impl}.json"
    command = [
        sys.executable, __file__, "--worker", impl, "--weights", str(weights),
        "--image", str(args.image), "--reps", str(args.reps),
        "--points-per-side", str(args.points_per_side),
        "--pred-iou-thresh", str(args.pred_iou_thresh),
        "--stability-score-thresh", str(args.stability_score_thresh),
        "--box-nms-thresh", str(args.box_nms_thresh),
        "--out", str(out),
    ]
    subprocess.run(command, check=True, cwd=ROOT)
    return json.loads(out.read_text())


def parity(ours: dict, theirs: dict) -> tuple[float, float, str]:
    """Over masks matched in order: the minimum mask IoU, the largest predicted-IoU
    difference, and a line on the pairs below IoU 0.99: the worst one's areas and differing
    pixels, and whether each has a match at IoU >= 0.99 among its neighbours in the other
    list (two masks with near-equal scores can come out in swapped order)."""
    from pycocotools import mask as mask_utils

    pairs = list(zip(ours["rles"], theirs["rles"]))
    ious = [mask_utils.iou([a], [b], [False])[0][0] for a, b in pairs]
    score_diffs = [abs(a - b) for a, b in zip(ours["predicted_iou"], theirs["predicted_iou"])]
    low = [i for i, iou in enumerate(ious) if iou < 0.99]
    detail = "every pair at IoU >= 0.99"
    if low:
        worst = min(low, key=lambda i: ious[i])
        a, b = (mask_utils.decode(rle).astype(bool) for rle in pairs[worst])
        swapped = 0
        for i in low:
            near = theirs["rles"][max(i - 3, 0) : i + 4]
            swapped += max(mask_utils.iou([ours["rles"][i]], near, [False] * len(near))[0]) >= 0.99
        detail = (f"{len(low)} of {len(ious)} pairs below IoU 0.99, {swapped} of them matched "
                  f"at >= 0.99 by a neighbour within 3 places; worst pair: areas {a.sum()} / "
                  f"{b.sum()} px, {(a ^ b).sum()} px differ")
    return float(min(ious, default=1.0)), max(score_diffs, default=0.0), detail


def knobs_from(args: argparse.Namespace) -> dict:
    return {
        "points_per_side": args.points_per_side,
        "pred_iou_thresh": args.pred_iou_thresh,
        "stability_score_thresh": args.stability_score_thresh,
        "box_nms_thresh": args.box_nms_thresh,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points-per-side", type=int, default=32)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--pred-iou-thresh", type=float, default=0.88)
    parser.add_argument("--stability-score-thresh", type=float, default=0.95)
    parser.add_argument("--box-nms-thresh", type=float, default=0.7)
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    parser.add_argument("--worker", choices=["official", "samkit"], help=argparse.SUPPRESS)
    parser.add_argument("--weights", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.weights, args.image, knobs_from(args), args.reps, args.out)
        return

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        weights = tmp / "vit_b_random.pth"
        make_weights(weights)
        theirs = run_worker("official", args, weights, tmp)
        ours = run_worker("samkit", args, weights, tmp)
    n_ours, n_theirs = len(ours["rles"]), len(theirs["rles"])
    min_iou, max_score_diff, mismatches = parity(ours, theirs)
    t_ours, t_theirs = statistics.median(ours["times"]), statistics.median(theirs["times"])
    h, w = load_photo(args.image).shape[:2]
    print(
        f"\nvit_b (random weights), {args.image.name} at {w}x{h}, points_per_side="
        f"{args.points_per_side}, pred_iou_thresh={args.pred_iou_thresh}, "
        f"stability_score_thresh={args.stability_score_thresh}, "
        f"box_nms_thresh={args.box_nms_thresh}, reps={args.reps}\n"
    )
    print("| implementation | median time (s) | peak RSS (MiB) | masks |")
    print("|---|---|---|---|")
    print(f"| official | {t_theirs:.2f} | {theirs['peak_rss_mib']:.0f} | {n_theirs} |")
    print(f"| samkit | {t_ours:.2f} | {ours['peak_rss_mib']:.0f} | {n_ours} |")
    print(f"\nspeed-up: {t_theirs / t_ours:.2f}x; mask counts "
          f"{'equal' if n_ours == n_theirs else 'DIFFER'}; masks matched in order: min IoU "
          f"{min_iou:.4f}, max |predicted_iou difference| {max_score_diff:.1e}\n{mismatches}")


if __name__ == "__main__":
    main()
