"""Cutting each request's answer out of a group's (service/engine/slicing.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from service.engine.model import Prediction
from service.engine.slicing import split
from service.engine.summaries import summarize_classification


def group_prediction(n: int) -> Prediction:
    logits = np.random.default_rng(0).normal(size=(50, n, 3)).astype(np.float32)
    summary = summarize_classification(logits, levels=[0.8, 0.9])
    return Prediction("torch", "cpu", "mc", 50, 0, summary=summary, warnings=["w"])


def leaves(value: object) -> list[object]:
    """Every leaf of a summary tree, in a fixed order."""
    if dataclasses.is_dataclass(value):
        return [x for f in dataclasses.fields(value) for x in leaves(getattr(value, f.name))]
    if isinstance(value, tuple):
        return [x for v in value for x in leaves(v)]
    return [value]


def test_split_cuts_per_input_values_and_shares_the_rest() -> None:
    whole = group_prediction(6)
    sizes, seeds = [1, 3, 2], [11, 12, 13]
    parts = split(whole, sizes, seeds)
    lo = 0
    for part, size, seed in zip(parts, sizes, seeds, strict=True):
        assert part.seed == seed
        a, b = leaves(part.summary), leaves(whole.summary)
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            if isinstance(y, np.ndarray) and y.ndim > 0 and y.shape[0] == 6:
                assert np.array_equal(x, y[lo : lo + size])
            else:
                assert x is y or x == y
        np.testing.assert_array_equal(
            part.summary.probabilities, whole.summary.probabilities[lo : lo + size]
        )
        lo += size


def test_each_answer_owns_its_warnings() -> None:
    parts = split(group_prediction(2), [1, 1], [1, 2])
    parts[0].warnings.append("only mine")
    assert parts[1].warnings == ["w"]


def test_sizes_must_cover_the_group() -> None:
    with pytest.raises(ValueError, match="do not add up"):
        split(group_prediction(4), [1, 2], [1, 2])
