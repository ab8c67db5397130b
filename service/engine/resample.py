"""A clip at another sample rate, brought to the model's: polyphase resampling, exactly
scipy.signal.resample_poly's (a Kaiser-windowed sinc low-pass, beta 5, half-length 10 taps per
step of the larger of the reduced up and down factors; the input taken as zero outside itself),
so a trainer who resamples with scipy, or librosa's res_type="polyphase", makes the same
samples. Written with numpy alone: scipy is not a dependency of the server.

Only as many input samples as the model's clip reads are needed (`needed`): the first n
outputs of a long clip equal those of the whole clip resampled, so a three-minute file at 48 kHz
is not filtered to be cut. The sums run row by row over a fixed table of taps (np.sum's pairwise
order, no BLAS): a clip's samples do not depend on what else is in the request.
"""

from __future__ import annotations

import functools
import math

import numpy as np

BETA = 5.0  # resample_poly's default window ("kaiser", 5.0)
HALF = 10  # its filter's half-length, in steps of max(up, down)
RATES = (1000, 384_000)  # what a model may declare (spec.AudioInput), and a file be resampled from
MAX_FACTOR = 4096  # reduced up or down above this: a table of over 80,000 taps; refused
CHUNK_VALUES = 1 << 20  # gathered [outputs, taps] values at a time (8 MiB)


def factors(rate_in: int, rate_out: int) -> tuple[int, int] | None:
    """(up, down) reduced by their greatest common divisor; None when either is over
    MAX_FACTOR (two rates without a usable common divisor, e.g. 44,101 and 16,000 Hz) or a
    rate is outside RATES (a file's header may say 4 Hz or 65 MHz: at 4,096 to 1, the whole
    file was decoded and filtered, 20 times its size in memory)."""
    if not (RATES[0] <= rate_in <= RATES[1] and RATES[0] <= rate_out <= RATES[1]):
        return None
    g = math.gcd(rate_in, rate_out)
    up, down = rate_out // g, rate_in // g
    return (up, down) if max(up, down) <= MAX_FACTOR else None


@functools.lru_cache(maxsize=16)
def _plan(up: int, down: int) -> tuple[np.ndarray, int]:
    """(taps [up, K]: phase p's taps h[p + k * up], first output's offset in the filtered,
    upsampled signal, in samples of the output rate), as resample_poly designs and pads them."""
    top = max(up, down)
    half = HALF * top
    n = 2 * half + 1
    m = np.arange(n) - half  # firwin(n, 1 / top, window=("kaiser", BETA)), fs 2
    h = (1.0 / top) * np.sinc(m / top) * np.kaiser(n, BETA)
    h = h / h.sum() * up
    pre = down - half % down  # zeros before the filter, so its centre lands on an output
    h = np.concatenate([np.zeros(pre), h])
    k = -(-len(h) // up)
    table = np.zeros(up * k)
    table[: len(h)] = h
    table = np.ascontiguousarray(table.reshape(k, up).T)  # [p, k] = h[p + k * up]
    table.setflags(write=False)
    return table, (half + pre) // down


def needed(n_out: int, up: int, down: int) -> int:
    """Input samples the first `n_out` outputs read (the rest of a clip changes none of them)."""
    _, skip = _plan(up, down)
    return (n_out - 1 + skip) * down // up + 1 if n_out > 0 else 0


def resample(x: np.ndarray, up: int, down: int, n_out: int | None = None) -> np.ndarray:
    """scipy.signal.resample_poly(x, up, down)[:n_out] for a 1-D float64 clip (`n_out` None:
    all ceil(len(x) * up / down) outputs)."""
    full = -(-len(x) * up // down)
    n = full if n_out is None else min(n_out, full)
    table, skip = _plan(up, down)
    k = table.shape[1]
    x = np.asarray(x, dtype=np.float64)
    back = np.arange(k)
    out = np.empty(n)
    step = max(1, CHUNK_VALUES // k)
    for lo in range(0, n, step):
        t = (np.arange(lo, min(lo + step, n)) + skip) * down  # in the upsampled signal
        at = (t // up)[:, None] - back[None, :]  # the inputs each output reads, newest first
        # A tap before the clip's start or past its end reads zero (upfirdn's); read in place,
        # not from a padded copy of the clip (a long file's copy doubled its memory).
        rows = np.take(x, at, mode="clip")
        rows[(at < 0) | (at >= len(x))] = 0.0
        out[lo : lo + len(t)] = (rows * table[t % up]).sum(axis=1)
    return out
