"""fp32 matrix products on this CPU: ``F.linear`` (MKL's sgemm in PyTorch's CPU build) vs
``samkit.modeling.kernels.linear`` (oneDNN, as a 1 x 1 convolution), on the encoders' shapes.

Run by hand (never in CI):  python benchmarks/gemm.py [--reps 10]

Prints GFLOP/s for each route and the largest difference of each from a float64 product.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from samkit.modeling.kernels import linear

# rows x in x out: the decoder's upscaler, vit_b's qkv (windowed, padded), MLP in and out.
SHAPES = [(8192, 256, 256), (4900, 768, 2304), (4096, 768, 3072), (4096, 3072, 768)]


def gflops(fn, flop: float, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return flop / statistics.median(times) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| rows x in x out | F.linear GFLOP/s | samkit linear GFLOP/s | max err vs fp64 (F / samkit) |")
    print("|---|---:|---:|---|")
    with torch.inference_mode():
        for rows, k, n in SHAPES:
            x, w, b = torch.randn(rows, k), torch.randn(n, k), torch.randn(n)
            exact = x.double() @ w.double().T + b.double()
            errors = [(f(x, w, b) - exact).abs().max().item() for f in (F.linear, linear)]
            flop = 2.0 * rows * k * n
            mkl = gflops(lambda: F.linear(x, w, b), flop, args.reps)
            onednn = gflops(lambda: linear(x, w, b), flop, args.reps)
            print(f"| {rows}x{k}x{n} | {mkl:.0f} | {onednn:.0f} | {errors[0]:.1e} / {errors[1]:.1e} |")


if __name__ == "__main__":
    main()
