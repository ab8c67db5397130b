"""Cutting each request's answer out of a group's (engine/prediction.py split, slicing.py cut)."""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from service.encode import response_json
from service.engine import slicing
from service.engine.model import Prediction
from service.engine.prediction import source, split
from service.engine.slicing import cut
from service.engine.summaries import summarize_classification
from service.metrics import Metrics


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


def test_parts_are_cut_only_when_read() -> None:
    whole = group_prediction(5)
    whole.referral = None
    part = split(whole, [2, 3], [1, 2])[1]
    assert source(part) == (whole, 2, 5)  # readers of the group's rows cut nothing
    assert "_group" in part.__dict__
    np.testing.assert_array_equal(part.summary.label, whole.summary.label[2:5])  # first read
    assert "_group" not in part.__dict__
    assert source(part) == (part, 0, 3)
    assert part.referral is None


def test_a_part_equals_the_answer_cut_eagerly() -> None:
    whole = group_prediction(4)
    part = split(whole, [1, 3], [7, 8])[1]
    assert "_group" in part.__dict__
    eager = Prediction(
        "torch", "cpu", "mc", 50, 8, summary=cut(whole, 1, 4)[0], warnings=["w"], referral=None
    )
    assert repr(part) == repr(eager)  # repr reads every field: numbers, not identities
    copy = dataclasses.replace(part)
    assert "_group" not in copy.__dict__ and repr(copy) == repr(eager)


def test_threads_reading_one_part_get_one_cut() -> None:
    whole = group_prediction(64)
    parts = split(whole, [1] * 64, list(range(64)))
    with ThreadPoolExecutor(8) as pool:
        seen = list(pool.map(lambda k: parts[k % 64].summary, range(512)))
    for k, summary in enumerate(seen):
        assert summary is parts[k % 64].summary  # every reader saw the same object
        np.testing.assert_array_equal(
            summary.probabilities, whole.summary.probabilities[k % 64 :][:1]
        )


def test_native_answer_and_metrics_of_a_part_match_its_cut_copy() -> None:
    whole = group_prediction(6)
    parts = split(whole, [2, 1, 3], [1, 2, 3])
    labels = ["a", "b", "c"]
    model: Any = SimpleNamespace(
        name="m",
        version="1",
        digest="sha256:0",
        manifest=SimpleNamespace(outputs=SimpleNamespace(labels=labels)),
    )
    for part in parts:
        _, lo, hi = source(part)
        summary, referral = cut(whole, lo, hi)
        eager = Prediction("torch", "cpu", "mc", 50, part.seed, summary, None, ["w"], referral)
        lazy = Metrics()
        lazy.known.add("m")
        eager_metrics = Metrics()
        eager_metrics.known.add("m")
        assert response_json(model, part) == response_json(model, eager)
        lazy.observe_result("m", part, 1)
        eager_metrics.observe_result("m", eager, 1)
        assert "_group" in part.__dict__  # neither cut the part
        name = "mcserve_mutual_information_sum"
        got = lazy.registry.get_sample_value(name, {"model": "m"})
        want = eager_metrics.registry.get_sample_value(name, {"model": "m"})
        assert got == want and got is not None and got > 0


def test_a_value_set_before_the_first_read_is_kept() -> None:
    whole = group_prediction(3)
    part = split(whole, [1, 2], [1, 2])[1]
    mine = cut(whole, 0, 1)[0]
    part.summary = mine  # type: ignore[assignment]
    assert part.summary is mine
    assert source(part)[0] is part  # no longer reads the group's rows
    part = split(whole, [1, 2], [1, 2])[0]
    part.referral = None
    np.testing.assert_array_equal(part.summary.label, whole.summary.label[:1])


def test_a_reader_during_the_cut_waits_for_it(monkeypatch: pytest.MonkeyPatch) -> None:
    whole = group_prediction(4)
    part = split(whole, [2, 2], [1, 2])[0]
    original = slicing.cut

    def slow(*args: Any) -> Any:
        time.sleep(0.2)  # the second reader arrives while the first is cutting
        return original(*args)

    monkeypatch.setattr(slicing, "cut", slow)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(lambda: part.summary)
        time.sleep(0.05)
        second = pool.submit(lambda: part.summary)
        assert first.result() is not None and second.result() is first.result()
