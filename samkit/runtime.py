"""Process-wide settings for fast CPU inference, which the ``samkit`` command applies to itself.

glibc's malloc serves large blocks (the encoder's attention buffers are hundreds of MB) with
``mmap`` and hands them back to the kernel on ``free``; the next forward pass page-faults them
in again, so system time rivals compute time. :func:`keep_freed_memory` makes malloc keep freed
memory for reuse instead. The cost: the process keeps its peak heap size until it exits.

Library users get the same with ``samkit.runtime.keep_freed_memory()`` early in their program,
or by starting Python with ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

# mallopt parameters (glibc malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
OPT_OUT_ENV = "SAMKIT_SYSTEM_MALLOC"  # set to 1 to leave malloc as it is


def keep_freed_memory() -> bool:
    """Tell glibc malloc not to use ``mmap`` for big blocks and not to trim the heap.

    Returns whether it took effect: False off Linux/glibc (other allocators already keep
    memory, or have their own knobs) or when ``SAMKIT_SYSTEM_MALLOC=1``.
    """
    if os.environ.get(OPT_OUT_ENV) == "1" or not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt"):  # musl and others
        return False
    trim_ok = libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(2**31 - 1))
    mmap_ok = libc.mallopt(M_MMAP_MAX, ctypes.c_int(0))
    return bool(trim_ok and mmap_ok)


@dataclass(frozen=True)
class CpuSample:
    """The machine's busy CPU time and this process's own, at one moment (Linux)."""

    wall_s: float
    machine_busy_s: float
    own_s: float


def sample_cpu() -> CpuSample | None:
    """Now's :class:`CpuSample`, from ``/proc/stat``; None where there is none."""
    try:
        with open("/proc/stat") as stat:
            ticks = [int(v) for v in stat.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    idle = ticks[3] + ticks[4]  # idle + iowait
    own = os.times()
    return CpuSample(time.monotonic(), (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK"),
                     own.user + own.system)


MIN_SAMPLE_S = 0.25  # shorter windows are too coarse for /proc/stat's 10 ms ticks


def default_threads(since: CpuSample | None = None) -> int:
    """Threads for the ``samkit`` command: one per core that other programs leave free.

    OpenMP threads spin while they wait for each other; on a core that another program keeps
    busy, the thread that shares it gets a slice of it and every parallel op waits for that
    slice, so on a loaded machine all cores is far slower than fewer threads. The cores other
    programs use are measured since ``since`` (the machine's busy CPU time less this
    process's own, over the wall time between; the ``samkit`` command samples before it
    imports torch), else taken from the 1-minute load average; at least one thread.
    ``benchmarks/threads.py`` measures this policy against the fixed ones.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    now = sample_cpu()
    if since is not None and now is not None and now.wall_s - since.wall_s >= MIN_SAMPLE_S:
        others = ((now.machine_busy_s - since.machine_busy_s) - (now.own_s - since.own_s)) / (
            now.wall_s - since.wall_s)
    else:
        try:
            others = os.getloadavg()[0]
        except (AttributeError, OSError):  # no load average on this platform
            others = 0.0
    return max(1, cores - round(others))


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run the block with ``count`` intra-op threads for torch (None: unchanged), then
    restore the previous count. Torch's count is not scoped to the block: torch work that
    other Python threads run meanwhile may use it too (their speed changes, and at most their
    float rounding), so servers that share a model hold their model lock around it."""
    import torch

    if count is None or count == torch.get_num_threads():
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def set_threads(threads: int) -> None:
    """Use ``threads`` CPU threads for torch's ops."""
    import torch

    torch.set_num_threads(threads)


# CPU features that decide which kernels torch's CPU paths can use (/proc/cpuinfo names).
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_report() -> str:
    """One line naming the CPU a number was measured on: model, the ISA flags that matter
    (:data:`ISA_FLAGS`), torch's CPU capability, torch and oneDNN versions, threads."""
    import torch

    model, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            lines = cpuinfo.read().splitlines()
    except OSError:  # not Linux: the platform's own name
        import platform

        lines, model = [], platform.processor() or model
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            model = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
            break
    present = [f for f in ISA_FLAGS if f in flags] or ["none of " + "/".join(ISA_FLAGS)]
    onednn = torch.backends.mkldnn.is_available() and next(
        (line.split("v", 1)[1].split()[0] for line in torch.__config__.show().splitlines()
         if "MKL-DNN v" in line or "oneDNN v" in line), "?")
    return (f"{model}, {os.cpu_count()} cores ({' '.join(present)}); torch "
            f"{torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}, "
            f"oneDNN {onednn or 'absent'}, {torch.get_num_threads()} thread(s)")
