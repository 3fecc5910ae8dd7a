"""Speed of the default model: samkit-tiny (HED VGG16 stem + SAM decoder, 512 px) beside a
TinyViT-5M at 512 px (MobileSAM's encoder at samkit-tiny's input size), same process.

Run by hand (never in CI):  python benchmarks/default_model.py [--reps 10] [--threads 2]

Rows: ``set_image`` of a 640 x 480 photo (resize, normalise, encode: the embedding a user
waits for), and one click (``predict`` with one point, 3 masks, at the photo's size). Each
row times both models alternately (so machine noise hits both) and reports medians. The
click is timed as the predictor runs it (a single prompt set decodes on one thread,
``SamPredictor.single_prompt_threads``) and with the decode on all ``--threads``.
Targets for samkit-tiny: embedding <= 0.3 s, click <= 5 ms (fp32, 2 threads, idle machine).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from samkit import SamPredictor
from samkit.build import build_sam
from samkit.images import load_image
from samkit.registry import MODEL_CONFIGS, SamConfig, TinyViTConfig
from samkit.runtime import cpu_report

PHOTO = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco_tiny_val2017" / "images"


def photo() -> np.ndarray:
    for path in sorted(PHOTO.glob("*.jpg")) if PHOTO.is_dir() else []:
        image = load_image(path)
        if image.shape[:2] == (480, 640):
            return image
    print("(no 640 x 480 shared photo: using a synthetic one)")
    return np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)


def median_seconds(fn: Callable[[], object], reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    image = photo()
    tiny_vit = SamConfig(TinyViTConfig(), image_size=512)
    models = {"samkit-tiny": build_sam("samkit-tiny"), "TinyViT-5M @ 512": build_sam(tiny_vit)}
    predictors = {name: SamPredictor(model) for name, model in models.items()}
    point, label = np.array([[320.0, 240.0]]), np.array([1])

    print(cpu_report())
    print(f"{args.reps} reps, photo {image.shape[1]}x{image.shape[0]}")
    print(f"{'model':<20} {'params':>8} {'set_image':>11} {'1 click':>9} "
          f"{'1 click, all threads':>21}")
    for name, predictor in predictors.items():
        params = sum(p.numel() for p in predictor.model.parameters()) / 1e6
        embed = median_seconds(lambda p=predictor: p.set_image(image), args.reps)
        predictor.set_image(image)
        click = median_seconds(lambda p=predictor: p.predict(point, label), args.reps * 5)
        predictor.single_prompt_threads = None  # the decode on all --threads, for the ratio
        all_threads = median_seconds(lambda p=predictor: p.predict(point, label),
                                     args.reps * 5)
        print(f"{name:<20} {params:>7.1f}M {embed * 1000:>8.0f} ms {click * 1000:>6.1f} ms "
              f"{all_threads * 1000:>18.1f} ms")
    print(f"(samkit-tiny: {MODEL_CONFIGS['samkit-tiny'].description})")


if __name__ == "__main__":
    main()
