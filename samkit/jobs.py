"""The one per-image job loop: work through the images a run still has to do, one result
each, surviving bad images.

``samkit everything`` (files in a folder, under torchrun too) and the data engine's stage 3
(rows of a project) are two uses of :func:`run_jobs`; what is already done, how an image is
read and what is written are theirs. The worker (a loaded model) is built at the first
readable image, so a run left with nothing to do, or only bad files, never loads a model.
Ray's pipeline (:mod:`samkit.everything_ray`) runs the same per-image step on its actors.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from samkit.errors import SamkitError, one_line

Item = TypeVar("Item")
Input = TypeVar("Input")
Worker = TypeVar("Worker")


@dataclass
class JobCounts:
    """What a run did: images done, failed, and the sum of what ``work`` returned (masks)."""

    done: int = 0
    failed: int = 0
    outputs: int = 0


@dataclass(frozen=True)
class Job(Generic[Item, Input, Worker]):
    """The parts of a run: ``read`` an item (a bad one raises :class:`SamkitError`), build
    the ``worker`` once, and ``work`` (write the result; returns how many outputs, e.g.
    masks). ``name`` names an item in messages."""

    read: Callable[[Item], Input]
    worker: Callable[[], Worker]
    work: Callable[[Item, Input, Worker], int]
    name: Callable[[Item], str]


def run_jobs(todo: Sequence[Item], job: Job[Item, Input, Worker], *, desc: str,
             fail_fast: bool = False) -> JobCounts:
    """Do every item of ``todo``. A bad image (a :class:`SamkitError`, or CUDA running out of
    memory on it) is reported on stderr and counted, or raised with ``fail_fast`` (one image
    is all there is); anything else is a bug and stops the run, which can be resumed."""
    from tqdm import tqdm

    counts = JobCounts()
    worker: Worker | None = None
    survivable = per_image_errors()
    # A bar for a single image says nothing, and would clutter its one-line error.
    for item in tqdm(todo, desc=desc, unit="img", dynamic_ncols=True, disable=len(todo) < 2):
        try:
            data = job.read(item)
        except survivable as err:
            _failed(counts, job.name(item), err, fail_fast)
            continue
        if worker is None:  # a failure to build it (say, a bad checkpoint) stops the run
            worker = job.worker()
        try:
            counts.outputs += job.work(item, data, worker)
        except survivable as err:
            _failed(counts, job.name(item), err, fail_fast)
            continue
        counts.done += 1
    return counts


def _failed(counts: JobCounts, name: str, err: BaseException, fail_fast: bool) -> None:
    if fail_fast:
        raise err
    report_failure(name, one_line(err))
    counts.failed += 1


def per_image_errors() -> tuple[type[BaseException], ...]:
    """What one image can cause (bad file, too big for the GPU) and the run survives."""
    import torch

    return SamkitError, torch.cuda.OutOfMemoryError


def report_failure(name: str, reason: str) -> None:
    """One line on stderr, written through tqdm so it does not tear the progress bar."""
    from tqdm import tqdm

    tqdm.write(f"samkit: skipped {name}: {reason}", file=sys.stderr)
