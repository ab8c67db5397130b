"""Fingerprints: a row's (was it trained or calibrated on, without storing the row) and a file's
(the sha256 a manifest lists for each artifact)."""

from __future__ import annotations

import hashlib
from pathlib import Path

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


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
