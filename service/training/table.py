"""A training CSV as numbers: a header, numeric feature columns, one target column.

Values must be finite numbers float32 can hold (the served model's precision), and precisely
enough: a column whose values float32 rounds by more than a thousandth of its standard deviation
(a date as YYYYMMDD, about 2e7 with a spread of a few hundred; a target of 1e9 + noise, served
in steps of 64) is refused before training, with the fix (subtract an offset, other units).
A constant regression target is refused (nothing to learn; as one class is for classification);
constant feature columns are noted. Missing values ("", "NA", "?", "-") are refused with their
row, as is a value that is not a number, with the fix that fits its column (`read_number`).
Classes are ordered as `--labels` lists them, else numeric labels by value and other labels
sorted as text (scikit-learn's order); `classes.py` says how numeric labels and missing values
are read. Rows are shuffled with the seed and cut 80/20 into training and calibration rows.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from service.calibration.csv_file import CsvFile, delimiter_hint, read_csv
from service.calibration.targets import number, read_number
from service.errors import InvalidInputError
from service.training.classes import classes

CALIBRATION_FRACTION = 0.2
# Float32's rounding (half its step at the column's largest value) may be at most this share of
# a column's standard deviation; `served.check_served` allows ten times it after training.
PRECISION = 1e-3


@dataclass(frozen=True)
class Table:
    """A CSV's feature columns (float64) and target (floats, or indices into `labels`)."""

    path: Path
    sha256: str
    feature_names: list[str]
    x: np.ndarray  # [N, F]
    y: np.ndarray  # [N] float64 (regression) or int64 label indices
    labels: list[str] | None  # classification: in `classes.classes`' order
    file: CsvFile  # where each row is (`file.locate(i)`), for messages
    notes: list[str] = field(default_factory=list)  # e.g. spellings of one class merged
    ignored: list[str] = field(default_factory=list)  # columns left out (`--ignore`)


def check_column(path: Path, header: list[str], column: str, what: str) -> None:
    """Refuse a file without the ``what`` ("target", "text") ``column``, naming its columns (and
    the delimiter, when the header looks split by another one than ',')."""
    if column in header:
        return
    why = f"{path}: no {what} column {column!r}; the columns are {header}"
    raise InvalidInputError(why + delimiter_hint(header))


def read_table(
    path: Path,
    target: str,
    task: str,
    labels_given: list[str] | None = None,
    ignore: list[str] | None = None,
) -> Table:
    """Read a CSV with a header: numeric feature columns plus the target column, less the
    ``ignore`` columns (the file read as `calibrate` reads it: `csv_file.read_csv`)."""
    f = read_csv(path)
    header = f.header
    check_column(path, header, target, "target")
    ignored = list(dict.fromkeys(ignore or []))
    for name in ignored:
        check_column(path, header, name, "--ignore")
    if target in ignored:
        raise InvalidInputError(f"--ignore names the target {target!r}; leave it out of --ignore")
    names = [h for h in header if h != target and h not in ignored]
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
            v, where = r[c].strip(), f"{f.locate(i)}, column {names[j]!r}"
            try:
                x[i, j] = read_number(v, where)
            except InvalidInputError:  # said again, with the fix that fits the column
                x[i, j] = read_number(v, where, _advice(names[j], f.column(names[j])))
    for j, name in enumerate(names):
        fix = "change its units (a date written as YYYYMMDD: convert it to days)"
        _check_precision(x[:, j], f"{path}: the column {name!r}", fix)
    constant = [n for j, n in enumerate(names) if np.ptp(x[:, j]) == 0]
    notes = []
    if constant:
        notes.append(
            f"the columns {constant} hold one value in every row: they tell the model nothing "
            "(drop them, or check the file)"
        )
    ids = [n for j, n in enumerate(names) if _like_an_identifier(x[:, j])]
    if ids:
        # An identifier is trained on, and every new one lies outside its training range: the
        # extrapolation trigger would refer every new patient (review CSV).
        notes.append(
            f"the columns {ids} hold a different whole number in every row, like an identifier: "
            f"if that is what they are, leave them out with --ignore {shlex.quote(','.join(ids))}"
        )
    values = [v.strip() for v in f.column(target)]
    if task == "classification":
        labels, y, merged = classes(values, labels_given, f.locate, path, target)
        if len(labels) < 2:
            raise InvalidInputError(f"{path}: the target {target!r} has fewer than 2 classes")
        return Table(path, f.sha256, names, x, y, labels, f, merged + notes, ignored)
    yf = np.array(
        [read_number(v, f"{f.locate(i)}, target {target!r}") for i, v in enumerate(values)],
        dtype=np.float64,
    )
    if np.ptp(yf) == 0:
        raise InvalidInputError(
            f"{path}: the target {target!r} is {values[0]} in every row: a regressor has nothing "
            "to learn (and would serve it with false confidence); check the column"
        )
    _check_precision(yf, f"{path}: the target {target!r}", "change its units")
    return Table(path, f.sha256, names, x, yf, None, f, notes, ignored)


def _advice(column: str, values: list[str]) -> str:
    """The fix for a value of ``column`` that is not a number: a slip in a column of numbers
    (a category or free-text advice told a user to drop a lab column), else a category or text
    column."""
    if sum(number(v.strip()) is not None for v in values) * 2 >= len(values):
        return f"; the other values of {column!r} are numbers: correct this one or drop the row"
    return (
        "; the features must be numbers: encode a category as numbers or drop the column; if "
        f"{column!r} is a column of free text, pass --text-column {shlex.quote(column)} to "
        "train a text model on it"
    )


def _like_an_identifier(column: np.ndarray) -> bool:
    """Whole numbers, each row its own, over enough rows that chance is no explanation."""
    n = len(column)
    return n >= 20 and bool(np.all(column == np.round(column))) and len(np.unique(column)) == n


def numeric(v: str) -> bool:
    """Whether `v` reads as a number (as the CSV reader would take it)."""
    try:
        float(v)
    except ValueError:
        return False
    return True


def _check_precision(v: np.ndarray, what: str, fix: str) -> None:
    """Refuse a column float32 (the served model's precision) rounds by more than `PRECISION` of
    its standard deviation."""
    std = float(np.std(v))
    top = float(np.max(np.abs(v)))
    error = float(np.spacing(np.float32(top))) / 2  # float32's rounding near its largest value
    if std > 0 and error > PRECISION * std:
        raise InvalidInputError(
            f"{what} holds values near {top:.10g} with a standard deviation of {std:.3g}: float32, "
            f"in which the served model computes, holds them only to ±{error:.3g}; subtract an "
            f"offset (e.g. its minimum) or {fix}"
        )


def split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, calibration rows): a seeded permutation cut 80/20."""
    perm = np.random.default_rng(seed).permutation(n)
    n_cal = round(CALIBRATION_FRACTION * n)
    return perm[n_cal:], perm[:n_cal]
