"""Pieces every protocol shares: the per-item error log, the sample loop and the
method loop (every method on every image, each image loaded once)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from samkit.errors import SamkitError, one_line
from samkit.eval.datasets import Dataset, Sample


@dataclass
class ErrorLog:
    """Problems with single items: each is printed as one line when it happens and kept for
    the JSON report, and the run goes on."""

    entries: list[dict[str, str]] = field(default_factory=list)

    def add(self, dataset: str, item: str, reason: str) -> None:
        self.entries.append({"dataset": dataset, "item": item, "error": reason})
        tqdm.write(f"samkit eval: skipped {dataset}/{item}: {reason}", file=sys.stderr)

    def for_dataset(self, dataset: str) -> list[dict[str, str]]:
        return [{"item": e["item"], "error": e["error"]} for e in self.entries
                if e["dataset"] == dataset]


def samples(dataset: Dataset, log: ErrorLog, desc: str = "") -> Iterator[Sample]:
    """Load the dataset's items in order with a progress bar, logging the ones that fail
    (and each bad object of the ones that load)."""
    for message in dataset.errors:
        item, _, reason = message.partition(": ")
        log.add(dataset.name, item, reason)
    bar = tqdm(dataset.items, desc=desc or dataset.name, unit="img", file=sys.stderr,
               dynamic_ncols=True)
    for item in bar:
        try:
            sample = item.load()
        except SamkitError as err:
            log.add(dataset.name, item.name, one_line(err))
            continue
        for reason in sample.errors:
            log.add(dataset.name, item.name, reason)
        yield sample


class MethodLoop:
    """Runs each of ``methods`` (``(name, fn(sample))``) on each sample of a dataset and
    yields ``(sample, name, output)``. A method's ``SamkitError`` on a sample is one logged
    line and skips only that pair. Afterwards :attr:`seconds` holds each method's own time
    (the caller's work on an output is not counted) and :attr:`images` the samples at least
    one method succeeded on."""

    def __init__(self, methods: Sequence[tuple[str, Callable[[Sample], Any]]]) -> None:
        self.methods = list(methods)
        self.seconds = dict.fromkeys((name for name, _ in self.methods), 0.0)
        self.images = 0

    def run(self, dataset: Dataset, log: ErrorLog, desc: str,
            keep: Callable[[Sample], bool] = lambda sample: True,
            ) -> Iterator[tuple[Sample, str, Any]]:
        for sample in samples(dataset, log, desc):
            if not keep(sample):
                continue
            evaluated = False
            for name, method in self.methods:
                start = time.perf_counter()
                try:
                    output = method(sample)
                except SamkitError as err:
                    log.add(dataset.name, sample.name, f"{name}: {one_line(err)}")
                    continue
                self.seconds[name] += time.perf_counter() - start
                evaluated = True
                yield sample, name, output
            self.images += evaluated
