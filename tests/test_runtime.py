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
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(32 * 2**20).sum()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, *faults)
"""
PAGES_128MB = 32 * 2**20 * 4 // 4096


def probe(mode: str, env: dict[str, str] | None = None) -> tuple[bool, list[int]]:
    """Whether the setting took effect, and the page faults of each of 8 allocate-fill-free
    rounds of a 128 MB tensor."""
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         check=True, env=(os.environ | (env or {}) | {"OMP_NUM_THREADS": "1"}))
    applied, *faults = out.stdout.split()
    return applied == "True", [int(f) for f in faults]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_freed_memory_is_reused() -> None:
    applied, kept = probe("keep")
    _, default = probe("default")
    assert applied
    # By default every round faults its 32,768 pages in again. Kept memory is reused once the
    # heap has settled (it grew in up to 3 of the first rounds in CI's environment).
    assert refaulted(default) == 8, default
    assert refaulted(kept[4:]) == 0, kept


def refaulted(faults: list[int]) -> int:
    """Rounds that faulted in more than half of the tensor's pages."""
    return sum(f > PAGES_128MB // 2 for f in faults)


def test_opt_out() -> None:
    applied, _ = probe("keep", {"SAMKIT_SYSTEM_MALLOC": "1"})
    assert not applied
