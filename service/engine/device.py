"""Devices and thread pools sized from the CPUs this process may really use."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch


def usable_cpus() -> int:
    """CPUs allowed by affinity and by a cgroup v2/v1 CPU quota (containers), at least 1."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)


def _cgroup_quota() -> float | None:
    v2 = Path("/sys/fs/cgroup/cpu.max")
    try:
        if v2.exists():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        q1 = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
        p1 = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")
        if q1.exists() and p1.exists():
            quota_us, period_us = int(q1.read_text()), int(p1.read_text())
            return None if quota_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None
    return None


def serving_threads() -> int:
    """Compute threads for a server: the usable CPUs less one for the HTTP event loop.

    Measured on 2 cores under load: with 2 intra-op threads beside a busy event loop, a
    100-row forward took 33 ms (threads waiting at OpenMP barriers for a descheduled peer);
    with 1 thread, 0.7 ms.
    """
    return max(1, usable_cpus() - 1)


def configure_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads (the setting wins, else `serving_threads()`)."""
    n = threads or serving_threads()
    torch.set_num_threads(n)
    return n


def describe(device: torch.device) -> str:
    """A device name for answers and metadata, e.g. 'cpu' or 'cuda:0 (NVIDIA H100)'."""
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{idx} ({torch.cuda.get_device_name(idx)})"
    return device.type


_ALLOCATOR_TUNED = False
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def tune_allocator(mmap_threshold: int = 32 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Keep tensor-sized blocks on the heap instead of fresh mmap()s (glibc only, idempotent).

    glibc serves blocks over its mmap threshold (128 KiB at first) with mmap and unmaps them on
    free, so every forward's activations were new zero-filled pages: measured on the digits
    head at T=100, B=64, 3.8 ms per MC call with page faults against 1.6 ms without. The cost:
    memory freed after a peak is kept for reuse instead of returned at once.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        ok = bool(libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(
            libc.mallopt(M_TRIM_THRESHOLD, trim_threshold)
        )
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    _ALLOCATOR_TUNED = ok
    return ok
