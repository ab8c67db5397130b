"""A training CSV as numbers: a header, numeric feature columns, one target column.

Classes are ordered as `--labels` lists them, else numeric labels by value and other labels
sorted as text (scikit-learn's order). Rows are shuffled with the seed and cut 80/20 into
training and calibration rows.
"""

from __future__ import annotations

import csv
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np

from service.errors import InvalidInputError

CALIBRATION_FRACTION = 0.2


@dataclass(frozen=True)
class Table:
    """A CSV's feature columns (float64) and target (floats, or indices into `labels`)."""

    path: Path
    sha256: str
    feature_names: list[str]
    x: np.ndarray  # [N, F]
    y: np.ndarray  # [N] float64 (regression) or int64 label indices
    labels: list[str] | None  # classification: in `label_order`'s order


def _number(v: str) -> float | None:
    try:
        f = float(v)
    except ValueError:
        return None
    return f if math.isfinite(f) else None


def label_order(values: list[str], given: list[str] | None, path: Path, target: str) -> list[str]:
    """The classes in output order: ``given`` (``--labels``) if set, else numeric labels by
    value (1, 2, 10, not "1", "10", "2") and any others sorted as text (scikit-learn's order)."""
    seen = set(values)
    if given is not None:
        if len(set(given)) != len(given):
            raise InvalidInputError(f"--labels {given}: a label is repeated")
        extra = sorted(seen - set(given))
        if extra:
            raise InvalidInputError(
                f"{path}: the target {target!r} has labels {extra} that --labels {given} "
                "does not list; list every class once, in the order you want"
            )
        return list(given)
    nums = {v: _number(v) for v in seen}
    if all(n is not None for n in nums.values()):
        return sorted(seen, key=lambda v: (cast(float, nums[v]), v))
    return sorted(seen)


def read_table(path: Path, target: str, task: str, labels_given: list[str] | None = None) -> Table:
    """Read a CSV with a header: numeric feature columns plus the target column."""
    raw = path.read_bytes()
    rows = [r for r in csv.reader(raw.decode("utf-8-sig").splitlines()) if r]
    if not rows:
        raise InvalidInputError(f"{path}: empty file")
    header, body = [h.strip() for h in rows[0]], rows[1:]
    if target not in header:
        raise InvalidInputError(f"{path}: no target column {target!r}; the columns are {header}")
    if len(set(header)) != len(header):
        raise InvalidInputError(f"{path}: repeated column names in the header {header}")
    names = [h for h in header if h != target]
    if not names:
        raise InvalidInputError(f"{path}: no feature columns besides the target {target!r}")
    if "target" in names:
        raise InvalidInputError(
            f"{path}: a feature column may not be called 'target' (calibration files use that "
            "name for the target); rename it"
        )
    if len(body) < 10:
        raise InvalidInputError(f"{path}: {len(body)} data rows are too few to train on")
    t_col = header.index(target)
    cols = [header.index(n) for n in names]
    x = np.empty((len(body), len(names)), dtype=np.float64)
    for i, r in enumerate(body):
        if len(r) != len(header):
            raise InvalidInputError(
                f"{path}: data row {i + 1} has {len(r)} fields, the header {len(header)}"
            )
        for j, c in enumerate(cols):
            try:
                x[i, j] = float(r[c])
            except ValueError:
                raise InvalidInputError(
                    f"{path}: data row {i + 1}, column {names[j]!r}: {r[c]!r} is not a number "
                    "(feature columns must be numeric)"
                ) from None
            if not math.isfinite(x[i, j]):
                raise InvalidInputError(
                    f"{path}: data row {i + 1}, column {names[j]!r}: {r[c]!r} is not finite"
                )
    values = [r[t_col].strip() for r in body]
    if task == "classification":
        labels = label_order(values, labels_given, path, target)
        if len(labels) < 2:
            raise InvalidInputError(f"{path}: the target {target!r} has fewer than 2 classes")
        index = {v: k for k, v in enumerate(labels)}
        y = np.array([index[v] for v in values], dtype=np.int64)
        return Table(path, hashlib.sha256(raw).hexdigest(), names, x, y, labels)
    try:
        yf = np.array([float(v) for v in values], dtype=np.float64)
    except ValueError as exc:
        raise InvalidInputError(f"{path}: the target {target!r} is not numeric ({exc})") from None
    if not np.isfinite(yf).all():
        raise InvalidInputError(f"{path}: the target {target!r} has non-finite values")
    return Table(path, hashlib.sha256(raw).hexdigest(), names, x, yf, None)


def split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, calibration rows): a seeded permutation cut 80/20."""
    perm = np.random.default_rng(seed).permutation(n)
    n_cal = round(CALIBRATION_FRACTION * n)
    return perm[n_cal:], perm[:n_cal]
