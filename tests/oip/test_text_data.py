"""A text model's BYTES input given as JSON `data`: the forms the protocol allows, and clear
refusals of the others (data nested against its shape, counts that disagree, non-strings)."""

from __future__ import annotations

from typing import Any

import pytest

from service.api.oip.binary import _json_texts
from service.errors import InvalidInputError


@pytest.mark.parametrize(
    ("shape", "data"),
    [([2], ["a", "b"]), ([2, 1], ["a", "b"]), ([2, 1], [["a"], ["b"]])],
    ids=["flat", "flat-for-B-1", "nested-B-1"],
)
def test_the_allowed_forms_give_the_texts(shape: list[int], data: list[Any]) -> None:
    assert _json_texts("input", shape, data) == ["a", "b"]


@pytest.mark.parametrize(
    ("shape", "data", "message"),
    [
        (
            [2],
            [["a", "b"]],
            "input 'input': data is nested in a way shape [2] does not have; send a flat list "
            "of strings",
        ),
        (
            [2, 1],
            [["a", "b"]],
            "input 'input': data is nested in a way shape [2, 1] does not have; send a flat list "
            "of strings or one list of one string per text",
        ),
        ([2], ["a"], "input 'input': data holds 1 elements but shape [2] declares 2 texts"),
        (
            [1],
            [5],
            "input 'input': data element 0 is int, not a string: send each text as a JSON string",
        ),
        (
            [2],
            ["a", None],
            "input 'input': data element 1 is null, not a string: send each text as a JSON string",
        ),
    ],
    ids=["nested-against-B", "two-per-row", "count", "number", "null"],
)
def test_other_forms_are_refused_with_the_fix(
    shape: list[int], data: list[Any], message: str
) -> None:
    with pytest.raises(InvalidInputError) as e:
        _json_texts("input", shape, data)
    assert e.value.message == message
