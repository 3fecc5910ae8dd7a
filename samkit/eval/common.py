"""Pieces every protocol shares: the per-item error log and the sample loop."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

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
