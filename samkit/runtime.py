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


# OpenMP's default is to spin a waiting thread for a while before sleeping. On a machine whose
# cores are busy with other work that spinning steals the core from the thread it waits for:
# benchmarks/threads.py measures the cost, and why PASSIVE is the command's default.
WAIT_POLICY_ENV = "OMP_WAIT_POLICY"
DEFAULT_WAIT_POLICY = "PASSIVE"


def default_openmp_wait_policy() -> None:
    """Make OpenMP threads sleep while they wait (unless ``OMP_WAIT_POLICY`` is already set).

    Takes effect only before OpenMP starts, i.e. before torch runs its first parallel op: the
    ``samkit`` command calls it before importing any command module.
    """
    os.environ.setdefault(WAIT_POLICY_ENV, DEFAULT_WAIT_POLICY)


def set_threads(threads: int | None) -> None:
    """Use ``threads`` CPU threads for torch's ops (None: leave torch's default, one per core)."""
    if threads is None:
        return
    import torch

    torch.set_num_threads(threads)
