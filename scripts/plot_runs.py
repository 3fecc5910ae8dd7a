"""Plot training curves of one or more runs (their ``metrics.csv``) into one PNG.

    python scripts/plot_runs.py runs/a runs/b --labels "default init" "localising init" \
        --out docs/samkit-tiny-curves.png

Panels: the first prompt's batch mIoU (``miou_first``, the mask a single click or box gives),
the loss, and the IoU head's MSE, each against the step (smoothed over ``--window`` logs).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from samkit.train.loop import read_metrics

PANELS = (("miou_first", "first-prompt mIoU (batch)"), ("loss", "loss"),
          ("iou_mse", "IoU-head MSE"))


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(values) < window:
        return values
    kernel = np.ones(window) / window
    return np.convolve(np.pad(values, (window - 1, 0), mode="edge"), kernel, mode="valid")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--labels", nargs="*")
    parser.add_argument("--window", type=int, default=5)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    labels = args.labels or [run.name for run in args.runs]
    if len(labels) != len(args.runs):
        raise SystemExit("plot_runs: error: give one label per run")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 3.6))
    for run, label in zip(args.runs, labels, strict=True):
        rows = read_metrics(run / "metrics.csv")
        steps = np.array([r["step"] for r in rows])
        for ax, (key, title) in zip(axes, PANELS, strict=True):
            values = np.array([r[key] for r in rows], dtype=float)
            ax.plot(steps, smooth(np.nan_to_num(values), args.window), label=label)
            ax.set_title(title)
            ax.set_xlabel("step")
    axes[0].legend()
    axes[0].set_ylim(0, 1)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
