"""samkit.runtime: keep_freed_memory (freed big blocks are reused, not faulted in again) and
the command's thread policy (threads for the cores other programs leave free)."""

from __future__ import annotations

import os
from pathlib import Path
import subprocess
import sys

import pytest

PROBE = """
import resource, sys, torch
from samkit.runtime import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
torch.ones(32 * 2**20).sum()  # 128 MB once, so the heap has grown when it is kept
faults = []
for _ in range(int(sys.argv[2])):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(32 * 2**20).sum()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, *faults)
"""
PAGES_128MB = 32 * 2**20 * 4 // 4096


def probe(mode: str, env: dict[str, str] | None = None, rounds: int = 8) -> tuple[bool, list[int]]:
    """Whether the setting took effect, and the page faults of each of `rounds` allocate-fill-free
    rounds of a 128 MB tensor."""
    out = subprocess.run([sys.executable, "-c", PROBE, mode, str(rounds)], capture_output=True,
                         text=True,
                         check=True, env=(os.environ | (env or {}) | {"OMP_NUM_THREADS": "1"}))
    applied, *faults = out.stdout.split()
    return applied == "True", [int(f) for f in faults]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_freed_memory_is_reused() -> None:
    applied, kept = probe("keep", rounds=32)
    _, default = probe("default")
    assert applied
    # By default every round faults its 32,768 pages in again. Kept memory is reused once the
    # heap has settled: while the small objects of a round sit between freed 128 MB blocks the
    # heap still grows, in the first rounds (up to round 7 in 20 runs here; round 9 in CI).
    # Settled, at most 2 of 16 rounds may grow it (without the setting all 16 would).
    assert refaulted(default) == 8, default
    assert refaulted(kept[16:]) <= 2, kept


def refaulted(faults: list[int]) -> int:
    """Rounds that faulted in more than half of the tensor's pages."""
    return sum(f > PAGES_128MB // 2 for f in faults)


def test_opt_out() -> None:
    applied, _ = probe("keep", {"SAMKIT_SYSTEM_MALLOC": "1"})
    assert not applied


def test_default_threads_leave_the_cores_other_programs_use(monkeypatch) -> None:
    from samkit import runtime

    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    start = runtime.CpuSample(wall_s=10.0, machine_busy_s=100.0, own_s=1.0)

    def now(machine_busy_s: float, own_s: float) -> None:
        sample = runtime.CpuSample(wall_s=12.0, machine_busy_s=machine_busy_s, own_s=own_s)
        monkeypatch.setattr(runtime, "sample_cpu", lambda: sample)

    now(machine_busy_s=102.0, own_s=3.0)  # 2 s of busy CPU in 2 s, all of it ours
    assert runtime.default_threads(start) == 4
    now(machine_busy_s=106.0, own_s=3.0)  # others kept 2 of the 4 cores busy
    assert runtime.default_threads(start) == 2
    now(machine_busy_s=120.0, own_s=3.0)  # others busier than the machine has cores: still 1
    assert runtime.default_threads(start) == 1
    # A window too short to measure falls back to the load average.
    monkeypatch.setattr(runtime, "sample_cpu", lambda: runtime.CpuSample(10.1, 100.0, 1.0))
    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (3.2, 0.0, 0.0))
    assert runtime.default_threads(start) == 1
    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (0.4, 0.0, 0.0))
    assert runtime.default_threads(None) == 4


def test_sample_cpu_reads_this_machine() -> None:
    from samkit.runtime import sample_cpu

    first = sample_cpu()
    if first is None:
        pytest.skip("no /proc/stat on this platform")
    sum(i * i for i in range(300_000))  # some CPU time of our own
    second = sample_cpu()
    assert second.wall_s > first.wall_s and second.own_s > first.own_s
    assert second.machine_busy_s >= first.machine_busy_s


def test_threads_flag_and_omp_num_threads_win(monkeypatch, tmp_path) -> None:
    """--threads N sets torch's thread count; without it OMP_NUM_THREADS is left alone."""
    import torch

    from samkit.cli import main

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert main(["weights", "list", "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(2)
        assert main(["weights", "list"]) == 0
        assert torch.get_num_threads() == 2  # the user's OMP_NUM_THREADS: samkit keeps out
    finally:
        torch.set_num_threads(before)


def test_cpu_report_names_the_cpu_its_isa_and_versions() -> None:
    import torch

    from samkit.runtime import ISA_FLAGS, cpu_report

    report = cpu_report()
    assert torch.__version__ in report and torch.backends.cpu.get_cpu_capability() in report
    assert f"{torch.get_num_threads()} thread(s)" in report
    flags = set(Path("/proc/cpuinfo").read_text().split())
    listed = set(report.split("(")[1].split(")")[0].split())
    assert {f for f in ISA_FLAGS if f in flags} == listed - {"none", "of"} - {"/".join(ISA_FLAGS)}
