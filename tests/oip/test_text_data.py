"""A text model's BYTES input given as JSON `data`: the forms the protocol allows, and clear
refusals of the others (data nested against its shape, counts that disagree, non-strings)."""

from __future__ import annotations

from typing import Any

import pytest

from service.api.oip.bytes_input import _json_strings, decode_texts
from service.api.oip.schemas import InputParameters, RequestInput
from service.bundle.spec import InputSpec, TextInput
from service.errors import InvalidInputError

SPEC = InputSpec(dtype="int64", shape=[8], text=TextInput(tokenizer="tokenizer.json", max_tokens=8))
TAIL = len(b"other text").to_bytes(4, "little") + b"other text"


@pytest.mark.parametrize(
    ("shape", "data"),
    [([2], ["a", "b"]), ([2, 1], ["a", "b"]), ([2, 1], [["a"], ["b"]])],
    ids=["flat", "flat-for-B-1", "nested-B-1"],
)
def test_the_allowed_forms_give_the_texts(shape: list[int], data: list[Any]) -> None:
    assert _json_strings("input", shape, data) == ["a", "b"]


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
        _json_strings("input", shape, data)
    assert e.value.message == message


def _bytes_input(data: list[Any] | None, size: int | None) -> RequestInput:
    params = InputParameters(binary_data_size=size) if size is not None else None
    return RequestInput(name="input", shape=[1], datatype="BYTES", data=data, parameters=params)


@pytest.mark.parametrize(
    ("data", "size", "tail", "message"),
    [
        (["a text"], len(TAIL), TAIL, "give either data or parameters.binary_data_size, not both"),
        (["a text"], 0, b"", "give either data or parameters.binary_data_size, not both"),
        (["a text"], None, TAIL, f"the body holds {len(TAIL)} bytes after the JSON header that "
         "no input claims (set parameters.binary_data_size)"),
        (None, None, b"", "input 'input' has no data: give the texts in data, or "
         "binary_data_size and the bytes after the JSON header"),
    ],
    ids=["data-and-binary", "data-and-size-0", "data-and-unclaimed-bytes", "neither"],
)  # fmt: skip
def test_json_and_binary_texts_are_never_mixed(
    data: list[Any] | None, size: int | None, tail: bytes, message: str
) -> None:
    """Both given: which texts were meant is unknown; answering for the binary ones alone
    would answer a question the client did not ask."""
    with pytest.raises(InvalidInputError) as e:
        decode_texts([_bytes_input(data, size)], memoryview(tail), SPEC, 8)
    assert message in e.value.message


def test_binary_texts_alone_are_read() -> None:
    got = decode_texts([_bytes_input(None, len(TAIL))], memoryview(TAIL), SPEC, 8)
    assert got == ["other text"]
