"""samkit.runtime.keep_freed_memory: freed big blocks are reused, not faulted in again."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = """
import resource, sys, torch
from samkit.runtime import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
torch.ones(32 * 2**20).sum()  # 128 MB once, so the heap has grown when it is kept
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    torch.ones(32 * 2**20).sum()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def probe(mode: str, env: dict[str, str] | None = None) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         check=True, env=(os.environ | (env or {}) | {"OMP_NUM_THREADS": "1"}))
    applied, faults = out.stdout.split()
    return applied == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_freed_memory_is_reused() -> None:
    applied, kept_faults = probe("keep")
    _, default_faults = probe("default")
    assert applied
    # 5 x 128 MB = 163,840 pages faulted in again by default; kept memory needs none of them.
    assert default_faults > 100_000
    assert kept_faults < default_faults / 10


def test_opt_out() -> None:
    applied, _ = probe("keep", {"SAMKIT_SYSTEM_MALLOC": "1"})
    assert not applied
