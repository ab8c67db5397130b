"""Cut one request's rows out of a group's summary and referral: summaries are computed once for
many requests.

`cut` makes a request's summary and referral when something reads them (prediction.py, which
imports this module and not the other way round): every per-input leaf (a batch-first array, a
per-input list) cut to the request's rows, shared values kept, objects rebuilt.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

import numpy as np


class Grouped(Protocol):
    """What `cut` reads of a group's answer (a `prediction.Prediction`)."""

    @property
    def summary(self) -> object: ...
    @property
    def referral(self) -> object: ...


_FIELDS: dict[type, tuple[str, ...] | None] = {}  # per class: its init fields, None if no dataclass


def _field_names(cls: type) -> tuple[str, ...] | None:
    try:
        return _FIELDS[cls]
    except KeyError:  # dataclasses.fields() is slow; this runs once per class
        names = None
        if dataclasses.is_dataclass(cls):
            names = tuple(f.name for f in dataclasses.fields(cls) if f.init)
        _FIELDS[cls] = names
        return names


def _split(value: object, bounds: Sequence[tuple[int, int]], n: int) -> list[object]:
    """`value` for each request: per-input values cut to each (lo, hi), the rest shared."""
    cls = type(value)
    if cls is np.ndarray or isinstance(value, np.ndarray):
        arr: np.ndarray = value  # type: ignore[assignment]
        if arr.ndim > 0 and arr.shape[0] == n:
            return [arr[lo:hi] for lo, hi in bounds]
        return [arr] * len(bounds)
    if cls is float or cls is int or cls is str or cls is bool or value is None:
        return [value] * len(bounds)
    names = _field_names(cls)
    if names is not None:
        # The constructor, not dataclasses.replace: measured 17 % of the compute thread.
        columns = [_split(getattr(value, k), bounds, n) for k in names]
        return [cls(**dict(zip(names, row, strict=True))) for row in zip(*columns, strict=True)]
    if isinstance(value, tuple):
        if not value:
            return [value] * len(bounds)
        parts = [_split(v, bounds, n) for v in value]
        return [tuple(row) for row in zip(*parts, strict=True)]
    if isinstance(value, list) and len(value) == n:
        return [value[lo:hi] for lo, hi in bounds]
    return [value] * len(bounds)


def cut(whole: Grouped, lo: int, hi: int) -> tuple[object, object]:
    """(summary, referral) of inputs lo:hi of a group's answer."""
    n = batch_size(whole)
    bounds = [(lo, hi)]
    return _split(whole.summary, bounds, n)[0], _split(whole.referral, bounds, n)[0]


def batch_size(whole: Grouped) -> int:
    """How many inputs a group's summary covers; a ValueError if it has no per-input arrays."""
    n = summary_inputs(whole.summary)
    if n is None:
        raise ValueError("a summary without per-input arrays")
    return n


def summary_inputs(summary: object) -> int | None:
    """The length of a summary's batch-first arrays, None if it has none."""
    for arr in (getattr(summary, "mean", None), getattr(summary, "probabilities", None)):
        if isinstance(arr, np.ndarray):
            return int(arr.shape[0])
    return None
