"""The engine's answer for one request, which may be cut from a group's answer lazily.

Under load the batcher summarises many requests at once and hands each its part. Cutting every
request's summary and referral out of the group's (about 30 numpy views and five objects per
answer) was a third of the compute thread's time at concurrency 64, and the native answer and
the metrics need none of it: they read the group's arrays at the request's rows (`source`). So a
request's `summary` and `referral` are cut only when something reads them (`slicing.cut`); to
every reader they are ordinary attributes, and equality, `dataclasses.replace` and `repr` see
the cut values.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from service.engine import slicing
from service.engine.referral import Referral
from service.engine.slicing import summary_inputs
from service.engine.summaries import ClassificationSummary, RegressionSummary

Mode = Literal["mc", "deterministic"]
_CUTTING = threading.Lock()  # readers on other threads (any adapter's) see a whole cut


class _PerInput:
    """A per-input field: stored as usual, or cut from the group's answer on first read."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.key = "_" + name

    def __get__(self, obj: Prediction | None, owner: type | None = None) -> Any:
        if obj is None:
            return None  # the dataclass default
        d = obj.__dict__
        if "_group" in d:
            _cut(obj)
        return d[self.key]

    def __set__(self, obj: Prediction, value: Any) -> None:
        if "_group" in obj.__dict__:
            _cut(obj)  # else a later read would cut over this value (and its sibling)
        obj.__dict__[self.key] = value


@dataclass
class Prediction:
    """The engine's answer for one request (summaries hold numpy arrays, batch-first)."""

    backend: str
    device: str
    mode: Mode
    samples: int | None
    seed: int | None
    summary: RegressionSummary | ClassificationSummary | None = _PerInput()  # type: ignore[assignment]
    point: np.ndarray | None = None  # deterministic mode: [B, outputs]
    warnings: list[str] = field(default_factory=list)
    # MC mode: per input, should a human look (and why)
    referral: Referral | None = _PerInput()  # type: ignore[assignment]
    timing: dict[str, float] = field(default_factory=dict)  # queue_s, compute_s, batch_rows
    # Text models: per input, what tokenization did ({"tokens": n, "truncated": bool}).
    input_notes: list[dict[str, Any]] | None = None
    # MC mode: the last k dropout sites sampled (graph order); None: all (or deterministic mode).
    dropout_sites: int | None = None
    # samples="auto": the passes (`samples`) were chosen per request until its answer was sure.
    adaptive: bool = False
    # Encodings made by adapters, kept so that the answer and its audit record encode it once.
    encoded: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)


def part_of(whole: Prediction, lo: int, hi: int, seed: int | None) -> Prediction:
    """Inputs lo:hi of a group's answer, as one request's answer; cut on first read."""
    p = Prediction(whole.backend, whole.device, whole.mode, whole.samples, seed, None, None)
    p.dropout_sites = whole.dropout_sites
    p.warnings = list(whole.warnings)  # each answer may get its own warnings later
    p.__dict__["_group"] = (whole, lo, hi)
    return p


def split(pred: Prediction, sizes: Sequence[int], seeds: Sequence[int]) -> list[Prediction]:
    """Each request's Prediction out of a group's (`sizes` inputs each, in order), own seeds.

    Lazily: each answer's summary and referral are cut from the group's when first read (`_cut`);
    the native answer and the metrics read the group's rows instead (`source`)."""
    n = slicing.batch_size(pred)
    if sum(sizes) != n:
        raise ValueError(f"request sizes {list(sizes)} do not add up to the group's {n} inputs")
    ends = np.cumsum(sizes).tolist()
    return [
        part_of(pred, lo, hi, seed)
        for lo, hi, seed in zip([0, *ends[:-1]], ends, seeds, strict=True)
    ]


def source(p: Prediction) -> tuple[Prediction, int, int]:
    """(the answer that holds p's numbers, first row, end row), without cutting anything."""
    group = p.__dict__.get("_group")
    if group is not None:
        return group
    return p, 0, inputs(p)


def inputs(p: Prediction) -> int:
    """How many inputs the answer covers (0 if it holds no per-input arrays)."""
    n = summary_inputs(p.summary)
    if n is not None:
        return n
    return int(p.point.shape[0]) if p.point is not None else 0


def _cut(p: Prediction) -> None:
    with _CUTTING:
        group = p.__dict__.get("_group")
        if group is None:
            return  # another thread cut it
        whole, lo, hi = group
        p.__dict__["_summary"], p.__dict__["_referral"] = slicing.cut(whole, lo, hi)
        del p.__dict__["_group"]  # last: a reader that finds no _group finds the cut values
