"""A training CSV as numbers: a header, numeric feature columns, one target column.

Values must be finite numbers float32 can hold (the served model's precision). Classes are
ordered as `--labels` lists them, else numeric labels by value and other labels sorted as text
(scikit-learn's order); `classes.py` says how numeric labels and missing values are read.
Rows are shuffled with the seed and cut 80/20 into training and calibration rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from service.calibration.csv_file import read_csv
from service.calibration.targets import read_number
from service.errors import InvalidInputError
from service.training.classes import classes

CALIBRATION_FRACTION = 0.2


@dataclass(frozen=True)
class Table:
    """A CSV's feature columns (float64) and target (floats, or indices into `labels`)."""

    path: Path
    sha256: str
    feature_names: list[str]
    x: np.ndarray  # [N, F]
    y: np.ndarray  # [N] float64 (regression) or int64 label indices
    labels: list[str] | None  # classification: in `classes.classes`' order
    notes: list[str] = field(default_factory=list)  # e.g. spellings of one class merged


def read_table(path: Path, target: str, task: str, labels_given: list[str] | None = None) -> Table:
    """Read a CSV with a header: numeric feature columns plus the target column (the file read
    as `calibrate` reads it: `service.calibration.csv_file.read_csv`)."""
    f = read_csv(path)
    header = f.header
    if target not in header:
        raise InvalidInputError(f"{path}: no target column {target!r}; the columns are {header}")
    names = [h for h in header if h != target]
    if not names:
        raise InvalidInputError(f"{path}: no feature columns besides the target {target!r}")
    if "target" in names:
        raise InvalidInputError(
            f"{path}: a feature column may not be called 'target' (calibration files use that "
            "name for the target); rename it"
        )
    if len(f.rows) < 10:
        raise InvalidInputError(f"{path}: {len(f.rows)} data rows are too few to train on")
    cols = [header.index(n) for n in names]
    x = np.empty((len(f.rows), len(names)), dtype=np.float64)
    for i, r in enumerate(f.rows):
        for j, c in enumerate(cols):
            # Finite and within float32 (the served model's precision): a feature of 1e39
            # became infinity in the bundle, a target of 1e200 overflowed the noise fit.
            x[i, j] = read_number(r[c].strip(), f"{f.locate(i)}, column {names[j]!r}")
    values = [v.strip() for v in f.column(target)]
    if task == "classification":
        labels, y, notes = classes(values, labels_given, f.locate, path, target)
        if len(labels) < 2:
            raise InvalidInputError(f"{path}: the target {target!r} has fewer than 2 classes")
        return Table(path, f.sha256, names, x, y, labels, notes)
    yf = np.array(
        [read_number(v, f"{f.locate(i)}, target {target!r}") for i, v in enumerate(values)],
        dtype=np.float64,
    )
    return Table(path, f.sha256, names, x, yf, None)


def split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, calibration rows): a seeded permutation cut 80/20."""
    perm = np.random.default_rng(seed).permutation(n)
    n_cal = round(CALIBRATION_FRACTION * n)
    return perm[n_cal:], perm[:n_cal]
