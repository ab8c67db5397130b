"""The numba kernels behind fused.py: SplitMix64 mask bytes made and applied in one pass.

Imported on first use only (it imports numba, about 0.4 s). Module-level functions, because
numba caches their machine code on disk (`cache=True`) and loads it in later processes, where
it would recompile closures each time (up to 2 s per process). Each kernel is compiled twice,
over numba's threads and on the calling thread; numba keys its cache by the function's name, so
the serial build is a renamed copy and never loads the parallel one's code. numba reads only
this file to tell a cache is stale, so the mask constants are written out here (and checked
against masks.py's): changing them means editing this file, which recompiles the kernels.
"""

from __future__ import annotations

import logging
import types
from typing import Any

import numpy as np
from numba import njit, prange

from service.engine import masks

log = logging.getLogger(__name__)

GAMMA, MUL1 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9)
MUL2 = np.uint64(0x94D049BB133111EB)
if (int(GAMMA), int(MUL1), int(MUL2)) != (masks.GAMMA, masks.MUL1, masks.MUL2):
    raise ImportError("mask_kernels.py's constants differ from masks.py's: copy them here")


@njit(inline="always")
def word(base, w, key):  # type: ignore[no-untyped-def]
    z = (base + np.uint64(w)) * GAMMA + key  # masks.keep_bytes_rows, word w of a row
    z = (z ^ (z >> np.uint64(30))) * MUL1
    z = (z ^ (z >> np.uint64(27))) * MUL2
    return z ^ (z >> np.uint64(31))


# Two kernels: the general one's innermost loop (over the positions a channel's byte covers)
# made the elementwise case 4x slower (0.79 against 0.19 ms) even when it ran once.
def elementwise(x, src, keys, base, threshold, scale, out):  # type: ignore[no-untyped-def]
    # x: float32 [inputs, features], src: the row of x for each row of out (or empty: the
    # same row); out: float32 [rows, features]; one mask byte per element.
    rows, features = out.shape
    gather = src.shape[0] > 0
    full = features // 8
    thr = np.uint64(threshold)
    one, zero = np.float32(1.0), np.float32(0.0)
    for r in prange(rows):
        key, b = np.uint64(keys[r]), np.uint64(base[r])
        i = np.int64(src[r]) if gather else np.int64(r)  # one type for both
        for w in range((features + 7) // 8):
            z = word(b, w, key)
            n = 8 if w < full else features - 8 * w
            for q in range(n):  # byte q of the word is feature 8w + q (little-endian view)
                m = one if ((z >> np.uint64(8 * q)) & np.uint64(255)) < thr else zero
                out[r, 8 * w + q] = x[i, 8 * w + q] * m * scale  # as apply_keep rounds
    return out


def channels(x, src, keys, base, threshold, scale, out):  # type: ignore[no-untyped-def]
    # x: float32 [inputs, channels, positions], out [rows, channels, positions], src as
    # above; one mask byte per (row, channel).
    rows, features, inner = out.shape
    gather = src.shape[0] > 0
    full = features // 8
    thr = np.uint64(threshold)
    one, zero = np.float32(1.0), np.float32(0.0)
    for r in prange(rows):
        key, b = np.uint64(keys[r]), np.uint64(base[r])
        i = np.int64(src[r]) if gather else np.int64(r)  # one type for both
        for w in range((features + 7) // 8):
            z = word(b, w, key)
            n = 8 if w < full else features - 8 * w
            for q in range(n):
                m = one if ((z >> np.uint64(8 * q)) & np.uint64(255)) < thr else zero
                for s in range(inner):
                    out[r, 8 * w + q, s] = x[i, 8 * w + q, s] * m * scale
    return out


def _serial(f: Any) -> Any:
    g = types.FunctionType(f.__code__, f.__globals__, f.__name__ + "_serial")
    g.__qualname__ = g.__name__
    return g


def _jit(cache: bool) -> tuple[Any, Any, Any, Any]:
    flags: dict[str, Any] = {"boundscheck": False, "nogil": True, "cache": cache}
    return (
        njit(parallel=True, **flags)(elementwise),
        njit(parallel=True, **flags)(channels),
        njit(parallel=False, **flags)(_serial(elementwise)),
        njit(parallel=False, **flags)(_serial(channels)),
    )


try:
    ELEMENTWISE, CHANNELS, ELEMENTWISE_SERIAL, CHANNELS_SERIAL = _jit(cache=True)
except RuntimeError as exc:  # no writable cache directory: each process compiles them
    log.info("numba cannot cache the mask kernels here (%s): compiled in each process", exc)
    ELEMENTWISE, CHANNELS, ELEMENTWISE_SERIAL, CHANNELS_SERIAL = _jit(cache=False)
