"""Row fingerprints: tell whether a row was trained or calibrated on without storing the row."""

from __future__ import annotations

import hashlib

import numpy as np


def row_fingerprint(x: np.ndarray) -> list[str]:
    """Per row: the first 16 hex digits of sha256 over its features as float32 little-endian.

    `x` is [N, *features] (a 1-D array is one row). Images are flattened in C order. float32,
    because that is what the model sees: a CSV value read as float64 and the same value sent
    as JSON give the same fingerprint.
    """
    a = np.asarray(x)
    rows = a.reshape(1, -1) if a.ndim == 1 else a.reshape(a.shape[0], -1)
    return [hashlib.sha256(np.asarray(r, dtype="<f4").tobytes()).hexdigest()[:16] for r in rows]
