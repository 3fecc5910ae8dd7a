"""samkit.jobs.run_jobs: the per-image loop of `samkit everything` and the engine's stage 3."""

from __future__ import annotations

import pytest

from samkit.errors import SamkitError
from samkit.jobs import Job, run_jobs


def reader(item: str) -> str:
    if item.startswith("bad"):
        raise SamkitError(f"cannot decode image {item}: truncated\nsecond line")
    return item.upper()


def test_bad_items_are_counted_and_the_worker_is_built_once(
        capsys: pytest.CaptureFixture[str]) -> None:
    built = []
    job = Job(read=reader, worker=lambda: built.append(1) or "model",
              work=lambda item, data, worker: len(data), name=str)
    counts = run_jobs(["bad1", "ab", "bad2", "cde"], job, desc="t")
    assert (counts.done, counts.failed, counts.outputs, len(built)) == (2, 2, 5, 1)
    err = capsys.readouterr().err
    assert err.count("samkit: skipped bad") == 2 and "second line" not in err


def test_nothing_readable_never_builds_the_worker() -> None:
    def never() -> str:
        raise AssertionError("built")

    job = Job(read=reader, worker=never, work=lambda *_: 0, name=str)
    assert run_jobs(["bad1"], job, desc="t").failed == 1


def test_a_worker_that_cannot_be_built_stops_the_run() -> None:
    def broken() -> str:
        raise SamkitError("checkpoint x.pt is not a PyTorch/safetensors checkpoint")

    job = Job(read=reader, worker=broken, work=lambda *_: 0, name=str)
    with pytest.raises(SamkitError, match="not a PyTorch"):
        run_jobs(["a", "b"], job, desc="t")


def test_fail_fast_raises_the_first_bad_item() -> None:
    job = Job(read=reader, worker=lambda: None, work=lambda *_: 0, name=str)
    with pytest.raises(SamkitError, match="bad1"):
        run_jobs(["bad1", "a"], job, desc="t", fail_fast=True)
