"""A training CSV's classes: which there are, in which output order, and each row's class.

Values are read as `calibrate` and `evaluate` read them (`service.calibration.targets`):
numeric labels equal by value are one class ("1", "1.0" and "01"), named as first written in the
file, so a column that mixes 1 and 1.0 does not train two classes of the same number. Empty
values, numbers that are not finite ("NaN", "inf") and missing-value markers ("NA", "N/A",
"NULL", ...) are refused with their row: a missing value is not a class (a marker that
`--labels` lists is taken as the class it names).

Labels that differ only in case or spacing ("NO", "No", "no") are refused unless `--labels`
lists them: they had become separate classes without a word, and are more often one class
written several ways than classes of their own.

The order is `--labels` if given, else numeric labels by value (1, 2, 10, not "1", "10", "2")
and any others sorted as text (scikit-learn's order).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import cast

import numpy as np

from service.calibration.targets import NA_MARKERS, key, missing, number
from service.errors import InvalidInputError


def classes(
    values: list[str],
    given: list[str] | None,
    where: Callable[[int], str],
    path: Path,
    target: str,
) -> tuple[list[str], np.ndarray, list[str]]:
    """(labels in output order, each row's index into them, notes to print) for the stripped
    target ``values``; ``where(i)`` names row i, ``given`` is `--labels`."""
    listed = set(given or [])
    for i, v in enumerate(values):
        if ("\n" in v or "\r" in v) and "," in v:
            # A quote left open swallows the rows up to one that ends a field with a quote
            # (`6'2"`): one label holding them all, which train took as a class (review R19).
            # Rows hold commas; a label over lines without one ("low\nrisk") is kept.
            raise InvalidInputError(
                f"{where(i)}, target {target!r}: the label holds line breaks and commas, like "
                "rows swallowed by a quote opened there and closed lines later; close the "
                "quote (a quote inside a quoted field is written twice), or write the label "
                "on one line"
            )
        why = None if v in listed else missing(v)
        if why is not None:
            also = ", or list it in --labels if it is a class" if v.lower() in NA_MARKERS else ""
            raise InvalidInputError(
                f"{where(i)}, target {target!r}: {why} (a missing value, not a class); "
                f"fill it in or drop the row{also}"
            )
    if given is not None:
        labels = _given(values, given, path, target)
        index = {lab: k for k, lab in enumerate(labels)}
        by_key = {key(lab): k for k, lab in enumerate(labels)}
        y = [index[v] if v in index else by_key[key(v)] for v in values]
        return labels, np.array(y, dtype=np.int64), []
    _refuse_spellings(values, path, target)
    spellings: dict[Decimal | str, list[str]] = {}
    for v in values:  # file order: a class is named as first written
        seen = spellings.setdefault(key(v), [])
        if v not in seen:
            seen.append(v)
    names = {k: s[0] for k, s in spellings.items()}
    if all(isinstance(k, Decimal) for k in names):
        order = sorted(names, key=lambda k: cast(Decimal, k))
    else:
        order = sorted(names, key=lambda k: names[k])
    labels = [names[k] for k in order]
    position = {k: j for j, k in enumerate(order)}
    notes = [
        f"the target values {s} are one class {s[0]!r} (equal numbers)"
        for s in spellings.values()
        if len(s) > 1
    ]
    return labels, np.array([position[key(v)] for v in values], dtype=np.int64), notes


def _given(values: list[str], given: list[str], path: Path, target: str) -> list[str]:
    """`--labels` checked: no class twice (by value for numbers), every value of the data."""
    keys = [key(g) for g in given]
    if len(set(keys)) != len(keys):
        twice = [g for g, k in zip(given, keys, strict=True) if keys.count(k) > 1]
        same = " (equal numbers are one class)" if any(number(g) is not None for g in twice) else ""
        raise InvalidInputError(f"--labels {given}: the labels {twice} repeat a class{same}")
    listed, known = set(given), set(keys)
    extra = sorted({v for v in values if v not in listed and key(v) not in known})
    if extra:
        raise InvalidInputError(
            f"{path}: the target {target!r} has labels {extra} that --labels {given} "
            "does not list; list every class once, in the order you want"
        )
    return list(given)


def _refuse_spellings(values: list[str], path: Path, target: str) -> None:
    """Refuse labels (not numbers) that are one label but for case or spacing (unless --labels
    lists them), or Unicode form ("fièvre" with its è as one character or as e + a combining
    accent: two classes that printed alike; one label to `key`, so always refused)."""
    groups: dict[str, list[str]] = {}
    for v in values:
        if number(v) is None:
            seen = groups.setdefault(_composed(_spaced(v)).casefold(), [])
            if v not in seen:
                seen.append(v)
    forms: list[list[str]] = []  # spellings of one label in other Unicode forms
    cases: list[list[str]] = []  # labels (composed) that differ in case or spacing
    for g in groups.values():
        alike: dict[str, list[str]] = {}  # one label to `key`: equal once composed
        for v in g:
            alike.setdefault(_composed(v), []).append(v)
        forms += [sorted(m) for m in alike.values() if len(m) > 1]
        spellings = set(alike)  # apart in case or spacing: --labels may keep them apart
        if len(spellings) > 1:
            cases.append(sorted(spellings))
    said = []
    if forms:  # one label to every reader, and to `key`: no --labels can make two of it
        shown = ", ".join("[" + ", ".join(ascii(v) for v in g) + "]" for g in forms)
        said.append(
            "labels written in two Unicode forms (the same letters encoded two ways, code "
            f"points shown): {shown}; each group is one label: write it one way in the file "
            "(composed, NFC, as most editors do)"
        )
    if cases:
        said.append(
            f"labels that differ only in case or spacing: {', '.join(map(str, cases))}; if "
            "each group is one class, write it one way in the file; if they are different "
            "classes, list every class with --labels"
        )
    if said:
        raise InvalidInputError(f"{path}: the target {target!r} has " + "; and ".join(said))


def _spaced(v: str) -> str:
    return " ".join(v.split())


def _composed(v: str) -> str:
    return unicodedata.normalize("NFC", v)


def check_trained(
    labels: list[str], y: np.ndarray, train_rows: np.ndarray, path: Path, why: str, fix: str
) -> None:
    """Refuse classes without a training row, saying how many rows each has; ``why`` says where
    the split put them, ``fix`` what to do (e.g. "add rows of them, or try another --seed")."""
    counts = np.bincount(y, minlength=len(labels))
    # Only `--labels` can name a class without rows: no split (or seed) can give it any.
    unused = [labels[k] for k in range(len(labels)) if counts[k] == 0]
    if unused:
        one = len(unused) == 1
        raise InvalidInputError(
            f"{path}: --labels lists {', '.join(map(repr, unused))}, which no row of the data "
            f"has (a class needs training rows); drop {'it' if one else 'them'} from --labels, "
            f"or add rows of {'that class' if one else 'those classes'} to the data"
        )
    absent = sorted(set(range(len(labels))) - set(y[train_rows].tolist()))
    if absent:
        have = ", ".join(
            f"{labels[k]!r} has {counts[k]} row{'s' if counts[k] != 1 else ''}" for k in absent
        )
        raise InvalidInputError(
            f"{path}: the classes {[labels[k] for k in absent]} have no training rows: {have}, "
            f"and {why}; {fix}"
        )
