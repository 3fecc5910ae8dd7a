"""Decoder latency for one point prompt: onnxruntime fp32 vs int8, through ``decoder.onnx``
and through the shared-image pair, vs samkit's PyTorch predictor, same (random) weights,
plus the image encoder for context.

Run by hand (never in CI):
    python benchmarks/onnx_speed.py [--models samkit-tiny vit_b] [--repeats 50] [--threads 2]

For each model: build it (``torch.manual_seed(0)``; bundled weights if any, otherwise random),
export both graphs with int8 copies to a temporary folder, embed one 480x640 image with each
predictor, then time ``predict`` for one foreground point (``multimask_output=True``, the
default: 3 masks at 480x640, thresholded). Medians and 90th percentiles over ``--repeats``
runs after one warm-up. PyTorch and onnxruntime get the same number of threads. Prints a
markdown table; "decoder MiB" is the size of the per-prompt graph file, and "encoder" is
``set_image`` (resize, encoder graph, and for the shared-image rows the image-side graph).
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from samkit import SamPredictor, build_sam
from samkit.onnx.export import export_onnx
from samkit.onnx.predictor import OnnxSamPredictor, default_session_options

IMAGE_SIZE = (480, 640)


def timings_ms(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median and 90th percentile of ``repeats`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return float(np.median(times)), float(np.percentile(times, 90))


def onnx_predictor(folder: Path, int8: bool, shared: bool, threads: int) -> OnnxSamPredictor:
    options = default_session_options()
    options.intra_op_num_threads = threads
    if shared:
        return OnnxSamPredictor.from_folder(folder, int8=int8, session_options=options)
    suffix = ".int8.onnx" if int8 else ".onnx"
    return OnnxSamPredictor(
        folder / f"encoder{suffix}", folder / f"decoder{suffix}", session_options=options
    )


def bench_model(name: str, args: argparse.Namespace, folder: Path) -> list[list[str]]:
    """One table row per runtime for model ``name``."""
    torch.manual_seed(0)
    sam = build_sam(name)
    start = time.perf_counter()
    paths = export_onnx(sam, folder, model_name=name, quantize="int8")
    print(f"{name}: exported in {time.perf_counter() - start:.0f} s")
    image = np.random.default_rng(0).integers(0, 256, (*IMAGE_SIZE, 3), dtype=np.uint8)
    point = np.array([[IMAGE_SIZE[1] * 0.4, IMAGE_SIZE[0] * 0.6]])
    label = np.array([1])
    # Built one at a time and dropped after timing: five ViT-B encoder sessions at once hold
    # over 24 GiB (onnxruntime keeps each session's activation arena).
    predictors: dict[str, tuple[Callable[[], SamPredictor | OnnxSamPredictor], Path | None]] = {
        "PyTorch (SamPredictor)": (lambda: SamPredictor(sam), None)}
    for int8 in (False, True):
        for shared in (False, True):
            graph = "decoder_prompts" if shared else "decoder"
            runtime = (f"onnxruntime {'int8' if int8 else 'fp32'}, "
                       f"{'shared-image pair' if shared else 'decoder.onnx'}")
            predictors[runtime] = (
                lambda i=int8, s=shared: onnx_predictor(folder, i, s, args.threads),
                paths[f"{graph}_int8" if int8 else graph])
    rows = []
    for runtime, (make, decoder_file) in predictors.items():
        predictor = make()
        encode = timings_ms(lambda p=predictor: p.set_image(image), args.encoder_repeats)
        decode = timings_ms(lambda p=predictor: p.predict(point, label), args.repeats)
        del predictor
        gc.collect()
        size = f"{decoder_file.stat().st_size / 2**20:.1f}" if decoder_file else "-"
        rows.append([name, runtime, f"{decode[0]:.1f}", f"{decode[1]:.1f}", size,
                     f"{encode[0]:.0f}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["samkit-tiny", "vit_b"])
    parser.add_argument("--repeats", type=int, default=50, help="decoder runs per runtime")
    parser.add_argument("--encoder-repeats", type=int, default=3, help="encoder runs")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="threads for PyTorch and onnxruntime alike (default: all cores)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{os.cpu_count()} cores, {args.threads} threads, load average "
          f"{os.getloadavg()[0]:.1f}, image {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}, torch "
          f"{torch.__version__}")
    rows = []
    for name in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            rows += bench_model(name, args, Path(tmp))
    header = ["model", "runtime", "decoder median ms", "decoder p90 ms", "decoder MiB",
              "encoder median ms"]
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
