"""Throughput of ``samkit eval points``: objects per second at 5 clicks on GrabCut.

Run by hand (never in CI):  python benchmarks/eval_points.py [--limit 50] [--model samkit-tiny]
[--system-malloc]

Like the ``samkit`` command (so ``samkit eval points``), it first makes glibc malloc keep freed
memory (``samkit.runtime.keep_freed_memory``); ``--system-malloc`` measures without that.

Per image: the embedding, the box prompt, click 1 (3 masks) and 4 refinement clicks with
mask feedback, plus the click simulation and IoUs: everything ``eval points`` does for an
object at 5 clicks. Image decoding is timed separately. One warm-up image runs first.
GrabCut has one object per image, so the encoder's time per image bounds the rate.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from samkit.build import build_sam
from samkit.eval.datasets import open_dataset
from samkit.eval.points import PointsEvaluator
from samkit.eval.predictors import SamPromptPredictor
from samkit.registry import DEFAULT_MODEL
from samkit.runtime import keep_freed_memory

GRABCUT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "grabcut"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=GRABCUT)
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--clicks", type=int, default=5)
    parser.add_argument("--system-malloc", action="store_true",
                        help="leave glibc malloc's defaults (the samkit command does not)")
    args = parser.parse_args()
    kept = not args.system_malloc and keep_freed_memory()

    torch.manual_seed(0)
    predictor = SamPromptPredictor(build_sam(args.model), args.model)
    evaluator = PointsEvaluator(predictor, max_clicks=args.clicks)
    items = open_dataset(args.data, args.limit).items

    start = time.perf_counter()
    samples = [item.load() for item in items]
    load_s = time.perf_counter() - start
    evaluator.evaluate(samples[0])  # warm-up (first-call allocations, kernel selection)

    per_image, objects = [], 0
    for sample in samples:
        start = time.perf_counter()
        objects += len(evaluator.evaluate(sample))
        per_image.append(time.perf_counter() - start)
    start = time.perf_counter()
    for sample in samples:
        predictor.set_image(sample.image)
    embed_s = time.perf_counter() - start

    total = sum(per_image)
    print(f"model {args.model}, torch threads {torch.get_num_threads()}, {len(samples)} images, "
          f"{objects} objects, {args.clicks} clicks, "
          f"{'malloc keeps freed memory' if kept else 'glibc malloc defaults'}")
    print(f"evaluation: {objects / total:.2f} objects/s ({total:.1f} s; median "
          f"{statistics.median(per_image) * 1000:.0f} ms per image)")
    print(f"  of which embedding: {embed_s / len(samples) * 1000:.0f} ms per image "
          f"({embed_s / total:.0%})")
    print(f"image loading: {load_s / len(samples) * 1000:.0f} ms per image; end to end "
          f"{objects / (total + load_s):.2f} objects/s")


if __name__ == "__main__":
    main()
