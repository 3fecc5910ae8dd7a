"""samkit vs the official ``segment_anything`` code: same random vit_b weights, same process.

Run by hand (never in CI):  python benchmarks/speed.py [--reps 3] [--threads 2] [--keep-freed-memory]

``--keep-freed-memory`` applies ``samkit.runtime.keep_freed_memory()`` (what the ``samkit``
command does for itself) to the whole process, so to both the official and samkit's paths.

Each row times the official path and samkit's path alternately (so machine noise hits both),
reports medians, the ratio, and the accuracy of samkit's output against the official one.
Needs the test-only oracle: pip install segment-anything==1.0.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from official import SHARED, official_package, official_sam  # noqa: E402

from samkit import SamPredictor  # noqa: E402
from samkit.build import build_sam  # noqa: E402
from samkit.images import load_image  # noqa: E402
from samkit.runtime import keep_freed_memory  # noqa: E402


def alternate(fn_a: Callable[[], object], fn_b: Callable[[], object], reps: int) -> tuple[float, float]:
    """Median seconds of ``fn_a`` and ``fn_b``, run alternately after one warm-up each."""
    fn_a(), fn_b()
    times_a, times_b = [], []
    for _ in range(reps):
        for fn, times in ((fn_a, times_a), (fn_b, times_b)):
            times.append(timed(fn))
    return statistics.median(times_a), statistics.median(times_b)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def test_photo() -> np.ndarray:
    path = SHARED / "data" / "coco_tiny_val2017" / "images"
    files = sorted(path.glob("*.jpg")) if path.is_dir() else []
    if files:
        return load_image(files[0])
    print("(../shared/data absent: using a synthetic 480x640 image)")
    return np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per path")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--chunk-sizes", type=int, nargs="*", default=[],
                        help="also time samkit's 64 boxes at these decode_chunk_size values")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="glibc malloc keeps freed memory (both paths)")
    args = parser.parse_args()
    kept = args.keep_freed_memory and keep_freed_memory()
    allocator = "glibc malloc keeps freed memory" if kept else "glibc malloc defaults"
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    official_model = official_sam(12, 768, 12, (2, 5, 8, 11))
    ours = build_sam("vit_b")
    ours.load_state_dict(official_model.state_dict())
    theirs, mine = official_package().SamPredictor(official_model), SamPredictor(ours)
    image = test_photo()
    h, w = image.shape[:2]
    rows: list[tuple[str, float, float, str]] = []

    x = torch.randn(1, 3, 1024, 1024)
    with torch.inference_mode():
        t_off, t_ours = alternate(lambda: official_model.image_encoder(x), lambda: ours.image_encoder(x), args.reps)
        diff = (official_model.image_encoder(x) - ours.image_encoder(x)).abs().max().item()
    rows.append(("image encoder, 1x1024² fp32", t_off, t_ours, f"max abs diff {diff:.1e}"))

    # bf16 autocast encoder (samkit option) vs the official fp32 encoder; accuracy vs fp32.
    bf16 = SamPredictor(ours, encoder_dtype=torch.bfloat16)
    t_off, t_bf16 = alternate(lambda: theirs.set_image(image), lambda: bf16.set_image(image), args.reps)
    mine.set_image(image)
    point = np.array([[w * 0.5, h * 0.5]])
    m32, _, _ = mine.predict(point, np.array([1]))
    m16, _, _ = bf16.predict(point, np.array([1]))
    rel = ((bf16.features - mine.features).norm() / mine.features.norm()).item()
    iou = min((a & b).sum() / max((a | b).sum(), 1) for a, b in zip(m32, m16, strict=True))
    rows.append(("set_image: official fp32 vs samkit bf16 autocast", t_off, t_bf16,
                 f"embedding rel. error {rel:.1e}, 1-point mask IoU vs fp32 {iou:.3f}"))

    theirs.set_image(image)
    mine.set_image(image)
    point, label = np.array([[w * 0.5, h * 0.5]]), np.array([1])
    t_off, t_ours = alternate(lambda: theirs.predict(point, label), lambda: mine.predict(point, label), args.reps * 10)
    _, s1, l1 = theirs.predict(point, label)
    _, s2, l2 = mine.predict(point, label)
    rows.append(("decoder, 1 point, multimask (predict)", t_off, t_ours,
                 f"logits {np.abs(l1 - l2).max():.1e}, iou {np.abs(s1 - s2).max():.1e}"))

    rng = np.random.default_rng(0)
    xy0 = rng.uniform(0, [w * 0.7, h * 0.7], size=(64, 2))
    boxes = np.concatenate([xy0, xy0 + rng.uniform(20, [w * 0.3, h * 0.3], size=(64, 2))], axis=1)
    t_off, t_ours = alternate(
        lambda: [theirs.predict(box=b) for b in boxes],
        lambda: mine.predict_batch(boxes=boxes),
        max(args.reps, 2),
    )
    _, s_batch, l_batch = mine.predict_batch(boxes=boxes)
    worst = max(np.abs(theirs.predict(box=b)[2] - l_batch[i].numpy()).max() for i, b in enumerate(boxes[:8]))
    rows.append(("64 boxes: 64 official calls vs 1 batched call", t_off, t_ours, f"logits {worst:.1e} (first 8)"))
    default_chunk = mine.decode_chunk_size
    for chunk in args.chunk_sizes:
        mine.decode_chunk_size = chunk
        t_chunk = min(timed(lambda: mine.predict_batch(boxes=boxes)) for _ in range(max(args.reps, 2)))
        print(f"samkit 64 boxes, decode_chunk_size={chunk}: {t_chunk * 1e3:.0f} ms (best of {max(args.reps, 2)})")
    mine.decode_chunk_size = default_chunk

    print(f"\nvit_b random weights, {h}x{w} photo, torch {torch.__version__}, {args.threads} threads, "
          f"median of {args.reps}+ runs, {allocator}\n")
    print("| path | official | samkit | speed-up | samkit vs official |")
    print("|---|---:|---:|---:|---|")
    for name, a, b, acc in rows:
        print(f"| {name} | {a * 1e3:.0f} ms | {b * 1e3:.0f} ms | {a / b:.2f}x | {acc} |")


if __name__ == "__main__":
    main()
