"""``torch.compile`` (inductor, weights frozen) of samkit's vit_b image encoder vs samkit's
eager CPU paths, fp32 and bf16 autocast, same random weights, same process.

Run by hand (never in CI):
    python benchmarks/compile.py [--reps 3] [--keep-freed-memory]

Compiled graphs switch samkit's eager-only CPU kernels off (oneDNN products, blocked global
attention: see ``samkit.modeling.kernels.eager_on_cpu``) and get inductor's instead. Prints
the compile time, medians and the largest difference from eager.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch._inductor.config as inductor_config

from samkit import build_sam
from samkit.runtime import keep_freed_memory


def median_ms(fn: Callable[[], torch.Tensor], reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="glibc malloc keeps freed memory (what the samkit command does)")
    args = parser.parse_args()
    if args.keep_freed_memory:
        keep_freed_memory()
    torch.manual_seed(0)
    encoder = build_sam("vit_b").eval().image_encoder
    image = torch.randn(1, 3, 1024, 1024)
    inductor_config.freezing = True  # weights as constants: lets inductor pre-pack them
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, vit_b encoder, "
          f"1x1024², median of {args.reps}\n")
    print("| dtype | compile s | eager ms | compiled ms | compiled / eager | max abs diff |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, bf16 in (("fp32", False), ("bf16 autocast", True)):
        compiled = torch.compile(encoder)

        def run(model: Callable[[torch.Tensor], torch.Tensor], bf16: bool = bf16) -> torch.Tensor:
            with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                return model(image)

        start = time.perf_counter()
        out_compiled = run(compiled)
        compile_s = time.perf_counter() - start
        out_eager = run(encoder)
        diff = (out_compiled.float() - out_eager.float()).abs().max().item()
        eager_ms = median_ms(lambda run=run: run(encoder), args.reps)
        compiled_ms = median_ms(lambda run=run, c=compiled: run(c), args.reps)
        print(f"| {name} | {compile_s:.0f} | {eager_ms:.0f} | {compiled_ms:.0f} | "
              f"{compiled_ms / eager_ms:.2f} | {diff:.1e} |")
        torch._dynamo.reset()


if __name__ == "__main__":
    main()
