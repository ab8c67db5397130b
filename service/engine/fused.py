"""Dropout masks generated and applied in one pass over memory on the CPU (a numba kernel).

The torch path (`masks.keep_bytes_rows` -> `masks.keep_factors` -> `graph.apply_keep`) runs
about twenty elementwise operations, each a pass over a temporary as large as the mask. This
kernel computes the same SplitMix64 words in registers, turns each byte into keep or drop and
writes `x * keep * scale` once, in the same order of float operations: the results are
bit-identical to the torch path (tested), and measured 0.20 ms against 0.77 ms for 6,400 rows of
128 features (the digits head at T = 100, B = 64) on 2 CPU cores.

numba compiles the kernels when the first model loads (`verified`: compiled and checked against
the torch path; up to 2 s per process) and keeps the machine code on disk, in `__pycache__`
beside this file or, where that is read-only, under `$XDG_CACHE_HOME/numba` (`NUMBA_CACHE_DIR`
overrides both): later processes on the machine load it (a restarted compute process or
server; with the compute process the server itself never uses the kernels). numba keys that
cache by the CPU, so another CPU compiles its own; the directory is not for sharing between
machines (numba writes its index without a lock). Where numba is missing, a kernel fails that
check, or the tensor is not float32 on the CPU, the torch path runs, which gives the same
numbers.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from service.engine.masks import keep_bytes_rows, keep_factors

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MaskRows:
    """What a dropout site needs to make its masks: per row its layer key and counter base."""

    keys: torch.Tensor  # int64 [rows]
    base: torch.Tensor  # int64 [rows]
    threshold: int  # a byte u keeps its unit when u < threshold
    mask_shape: tuple[int, ...]  # per row, excluding the row dimension (see graph.DropoutSite)
    # The row of x each mask row applies to, where x is not yet gathered into rows (a prefix
    # value read in place: one copy of [rows, features] less); None: x has one row per mask row.
    rows: torch.Tensor | None = None

    @property
    def features(self) -> int:
        return int(np.prod(self.mask_shape))

    def keep(self) -> torch.Tensor:
        """0/1 float keep factors [rows, *mask_shape] (the torch path)."""
        u = keep_bytes_rows(self.keys, self.base, self.features)
        return keep_factors(u, self.threshold).view(-1, *self.mask_shape)


class Kernels(NamedTuple):
    elementwise: Any  # each compiled twice: over numba's threads, and on the calling thread
    channels: Any
    elementwise_serial: Any
    channels_serial: Any


def _build_kernels() -> Kernels:
    from service.engine import mask_kernels as k  # imports numba: about 0.4 s, on first use

    return Kernels(k.ELEMENTWISE, k.CHANNELS, k.ELEMENTWISE_SERIAL, k.CHANNELS_SERIAL)


_kernels: Kernels | None = None
_kernel_failed = False
# Parallel calls take this lock: numba's "workqueue" threading layer (its fallback where no
# OpenMP or TBB runtime is found) must not be entered by two threads at once; with "omp" (found
# here) the lock is merely cheap.
_lock = threading.Lock()


def kernels() -> Kernels | None:
    """The compiled kernels, or None where numba cannot be imported."""
    global _kernels, _kernel_failed
    if _kernels is None and not _kernel_failed:
        with _lock:
            if _kernels is None and not _kernel_failed:
                try:
                    _kernels = _build_kernels()
                except Exception as exc:  # not installed, or an import error of its own
                    _kernel_failed = True
                    log.warning("numba unavailable (%s): dropout masks use the torch path", exc)
    return _kernels


_verified: dict[tuple[bool, bool], bool] = {}  # (channels, parallel) -> kernel agrees


def verified(channels: bool) -> bool:
    """Compile the kernels a sampler may use and check them against the torch path, once.

    Run when a model loads, so that a kernel numba cannot compile here (an unusual CPU or
    library version) or that disagrees makes the model use the torch path instead of failing
    requests. `channels`: also the channel-dropout kernel; the parallel build only where torch
    has more than one thread.
    """
    if kernels() is None:
        return False
    builds = {False, torch.get_num_threads() > 1}
    kinds = [False, True] if channels else [False]
    for kind in kinds:
        for parallel in builds:
            key = (kind, parallel)
            if key not in _verified:
                _verified[key] = _check(kind, parallel)
    return all(_verified[(k, p)] for k in kinds for p in builds)


def _check(channels: bool, parallel: bool) -> bool:
    g = torch.Generator().manual_seed(0)
    shape: tuple[int, ...] = (5, 1, 1) if channels else (13,)
    x = torch.randn(4, *((5, 2, 3) if channels else shape), generator=g)
    rows = torch.randint(0, 4, (9,), generator=g)
    keys = torch.randint(-(2**62), 2**62, (9,), generator=g)
    base = torch.arange(9, dtype=torch.int64) << 24
    mask = MaskRows(keys, base, 179, shape, rows)
    try:
        got = apply_mask(x, mask, 256 / 179, parallel=parallel)
    except Exception as exc:
        log.warning("mask kernel failed (%s: %s): the torch path is used", type(exc).__name__, exc)
        return False
    ok = torch.equal(got, x.index_select(0, rows).mul(mask.keep()).mul_(256 / 179))
    if not ok:
        log.warning("mask kernel disagrees with the torch path here: the torch path is used")
    return ok


def apply_mask(
    x: torch.Tensor,
    mask: MaskRows,
    scale: float,
    *,
    parallel: bool | None = None,
    inplace: bool = False,
) -> torch.Tensor:
    """Inverted dropout of x [rows, *shape] (or x's rows `mask.rows`) with the masks described.

    `parallel`: over numba's threads (None: where torch has more than one thread and the work
    has at least PARALLEL_MIN_ELEMENTS elements). `inplace`: write the result into x (where x
    has one row per mask row and nothing else reads it: see inplace.py); the same numbers, each
    element read before it is written."""
    ks = kernels()
    inplace = inplace and mask.rows is None and x.shape[0] == mask.keys.shape[0]
    if ks is None or not _fits(x, mask):
        if mask.rows is not None:
            x = x.index_select(0, mask.rows)
        keep = mask.keep()
        same = torch.broadcast_shapes(x.shape, keep.shape) == x.shape
        if inplace and same and torch.result_type(x, keep) == x.dtype:
            return x.mul_(keep).mul_(scale)
        return x.mul(keep).mul_(scale)
    features = mask.features
    src = x.contiguous().view(x.shape[0], features, -1)
    if src.shape[2] == 1:
        src = src.view(x.shape[0], features)
    rows = mask.keys.shape[0]
    out = src if inplace else torch.empty((rows, *src.shape[1:]), dtype=src.dtype)
    args = (
        src.numpy(),
        mask.rows.numpy() if mask.rows is not None else _NO_ROWS,
        mask.keys.numpy(),
        mask.base.numpy(),
        mask.threshold,
        np.float32(scale),
        out.numpy(),
    )
    threads = torch.get_num_threads()  # numba follows torch's setting (device.configure_threads)
    if parallel is None:
        parallel = threads > 1 and out.numel() >= PARALLEL_MIN_ELEMENTS
    if parallel:
        with _lock:
            _set_threads(threads)
            (ks.elementwise if src.dim() == 2 else ks.channels)(*args)
    else:
        (ks.elementwise_serial if src.dim() == 2 else ks.channels_serial)(*args)
    return out.view(rows, *x.shape[1:])


def _fits(x: torch.Tensor, mask: MaskRows) -> bool:
    """Does the kernel's layout hold (it reads without bounds checks)? Else the torch path,
    whose broadcasting covers the rest (e.g. dropout on a parameter: one row for all rows)."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() < 2:
        return False
    shape, per_row = mask.mask_shape, tuple(x.shape[1:])
    elementwise = shape == per_row
    channels = shape == (per_row[0],) + (1,) * (len(per_row) - 1)
    if not (elementwise or channels):
        return False
    rows = mask.keys.shape[0]
    if mask.base.shape[0] != rows:
        return False
    if mask.rows is None:
        return x.shape[0] == rows
    return (
        mask.rows.shape[0] == rows
        and rows > 0
        and int(mask.rows.min()) >= 0
        and int(mask.rows.max()) < x.shape[0]
    )


_NO_ROWS = np.empty(0, dtype=np.int64)
# Below this many elements the kernel runs on the calling thread (torch's own grain size for
# elementwise work). Above it numba's threads: measured in the engine on 2 cores to win from
# 102,400 elements up (0.82-0.98 x the serial time; in the interleaved benchmark, the digits
# CNN at 1.91-1.95 x one deterministic pass against 2.17-2.29 x serial); between 32,768 and
# 102,400 not measured.
PARALLEL_MIN_ELEMENTS = 32768


def _set_threads(n: int) -> None:
    import numba

    n = max(1, min(n, int(numba.config.NUMBA_NUM_THREADS)))  # type: ignore[attr-defined]
    if numba.get_num_threads() != n:
        numba.set_num_threads(n)
