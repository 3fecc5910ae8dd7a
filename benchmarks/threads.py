"""Thread policy of the ``samkit`` command on an idle and on a loaded machine.

Run by hand (never in CI, never beside a training run or the tests):

    python benchmarks/threads.py [--reps 3] [--points-per-side 16]

The workload is a real command, ``samkit everything examples/sample.png --points-per-side N``
(load the model, embed once, decode N² points), run as a fresh process per timing so each
gets its own OpenMP start-up. Policies:

- ``1 thread``: ``--threads 1``;
- ``all cores``: one thread per core (torch's default) with OpenMP's own wait policy (spin
  for a while, then sleep);
- ``all cores, passive wait``: the same with ``OMP_WAIT_POLICY=PASSIVE`` (threads sleep at
  once);
- ``samkit default``: no flag: one thread per core that other programs leave free, measured
  while the command starts (``samkit.runtime.default_threads``).

"loaded" runs a busy loop in another process (one core's worth of someone else's work)
during the timings. Rows alternate policies so machine noise hits all; the table gives medians and
each policy's ratio to the best policy in its condition.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "examples" / "sample.png"
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
POLICIES = {
    "1 thread": ({}, ["--threads", "1"]),
    "all cores": ({}, ["--threads", str(CORES)]),
    "all cores, passive wait": ({"OMP_WAIT_POLICY": "PASSIVE"}, ["--threads", str(CORES)]),
    "samkit default (free cores)": ({}, []),
}



def busy_loop() -> None:
    while True:
        pass


def time_command(env_extra: dict[str, str], flags: list[str], points: int) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    env.update(env_extra)
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "samkit.cli", "everything", str(SAMPLE), "-o", out,
                   "--points-per-side", str(points), *flags]
        start = time.perf_counter()
        subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        return time.perf_counter() - start


def measure(reps: int, points: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in POLICIES}
    for _ in range(reps):
        for name, (env, flags) in POLICIES.items():
            times[name].append(time_command(env, flags, points))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--points-per-side", type=int, default=16)
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores; samkit everything {SAMPLE.name} "
          f"--points-per-side {args.points_per_side}; medians of {args.reps}")
    results = {"idle": measure(args.reps, args.points_per_side)}
    hog = multiprocessing.Process(target=busy_loop, daemon=True)
    hog.start()
    try:
        results["loaded (1 busy core)"] = measure(args.reps, args.points_per_side)
    finally:
        hog.terminate()
    print("| machine | policy | wall s (median) | × best |")
    print("|---|---|---:|---:|")
    for condition, times in results.items():
        medians = {name: statistics.median(t) for name, t in times.items()}
        best = min(medians.values())
        for name, median in medians.items():
            print(f"| {condition} | {name} | {median:.2f} | {median / best:.2f} |")


if __name__ == "__main__":
    main()
