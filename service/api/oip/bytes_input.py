"""A text or audio model's one BYTES input on /v2: B texts (UTF-8 checked) or B WAV files.

JSON: `data` holds B strings: the texts, or the WAV files in base64 (JSON strings hold no raw
bytes). Binary extension: each element is a 4-byte little-endian length and that many bytes,
as Triton and tritonclient write BYTES tensors: the texts in UTF-8, or the WAV files as they are.
"""

from __future__ import annotations

from typing import Any

from service.api.oip.binary import _names
from service.api.oip.schemas import RequestInput
from service.bundle.spec import InputSpec
from service.engine.inputs import check_count
from service.errors import InvalidInputError


def decode_texts(
    inputs: list[RequestInput], binary: memoryview, spec: InputSpec, max_instances: int
) -> list[str]:
    """A text model's texts, shape [B] (or [B, 1])."""
    texts: list[str] = []
    values: list[str | bytes] = list(elements(inputs, binary, spec, max_instances, "texts"))
    for i, v in enumerate(values):
        if isinstance(v, str):
            texts.append(v)
            continue
        try:
            texts.append(v.decode("utf-8"))
        except UnicodeDecodeError:
            raise InvalidInputError(
                f"input '{spec.name}': element {i} is not valid UTF-8; send text in UTF-8"
            ) from None
    return texts


def elements(
    inputs: list[RequestInput],
    binary: memoryview,
    spec: InputSpec,
    max_instances: int,
    what: str = "texts",
) -> list[str] | list[bytes]:
    """The one BYTES input's B elements: strings from JSON `data`, bytes from the binary tail.
    `what`: "texts" or "clips", as messages call them."""
    if len(inputs) != 1 or inputs[0].name != spec.name:
        raise InvalidInputError(f"the model takes one input, '{spec.name}'; got {_names(inputs)}")
    (inp,) = inputs
    if inp.datatype != "BYTES":
        form = "strings" if what == "texts" else "WAV files"
        model = "a text" if what == "texts" else "an audio"
        raise InvalidInputError(
            f"input '{inp.name}': this is {model} model; send datatype BYTES ({form}), got "
            f"{inp.datatype}"
        )
    if len(inp.shape) not in (1, 2) or inp.shape[1:] not in ([], [1]) or inp.shape[0] < 1:
        raise InvalidInputError(
            f"input '{inp.name}': shape {inp.shape}; a batch of {what} is [B] or [B, 1]"
        )
    count = inp.shape[0]
    check_count(count, max_instances)
    size = inp.parameters.binary_data_size if inp.parameters else None
    if size is None:
        if inp.data is None:
            raise InvalidInputError(
                f"input '{inp.name}' has no data: give the {what} in data"
                + (" (base64)" if what == "clips" else "")
                + ", or binary_data_size and the bytes after the JSON header"
            )
        if len(binary):
            raise InvalidInputError(
                f"the body holds {len(binary)} bytes after the JSON header that no input claims "
                "(set parameters.binary_data_size)"
            )
        return _json_strings(inp.name, inp.shape, inp.data, what)
    if inp.data is not None:  # which elements were meant? Never answer for the other ones
        raise InvalidInputError(
            f"input '{inp.name}': give either data or parameters.binary_data_size, not both"
        )
    if len(binary) != size:
        raise InvalidInputError(
            f"the body holds {len(binary)} bytes after the JSON header but binary_data_size "
            f"is {size}"
        )
    out, at = [], 0
    for i in range(count):
        if at + 4 > size:
            raise InvalidInputError(f"input '{inp.name}': element {i}: its length is missing")
        n = int.from_bytes(binary[at : at + 4], "little")
        at += 4
        if at + n > size:
            raise InvalidInputError(f"input '{inp.name}': element {i} runs past the data")
        out.append(bytes(binary[at : at + n]))
        at += n
    if at != size:
        raise InvalidInputError(f"input '{inp.name}': {size - at} bytes after element {count - 1}")
    return out


def _json_strings(name: str, shape: list[int], data: list[Any], what: str = "texts") -> list[str]:
    """`data` of a BYTES input of `shape` [B] or [B, 1]: B strings, flat, or for [B, 1] also
    nested as one list of one string per element (the protocol allows both, nesting per shape)."""
    one = what.removesuffix("s")
    if any(isinstance(row, list) for row in data):
        if shape[1:] != [1] or not all(isinstance(row, list) and len(row) == 1 for row in data):
            form = "a flat list of strings" + (
                f" or one list of one string per {one}" if shape[1:] == [1] else ""
            )
            raise InvalidInputError(
                f"input '{name}': data is nested in a way shape {shape} does not have; send {form}"
            )
        data = [row[0] for row in data]
    if len(data) != shape[0]:
        raise InvalidInputError(
            f"input '{name}': data holds {len(data)} elements but shape {shape} declares "
            f"{shape[0]} {what}"
        )
    for j, v in enumerate(data):
        if not isinstance(v, str):
            kind = "null" if v is None else type(v).__name__
            form = "each text as a JSON string" if what == "texts" else "each WAV file in base64"
            raise InvalidInputError(
                f"input '{name}': data element {j} is {kind}, not a string: send {form}"
            )
    return data
