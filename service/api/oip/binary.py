"""Tensors in and out of /v2: JSON `data` and the binary tensor extension.

Binary tensor extension (Triton's `binary_tensor_data`): the body is a JSON header of
`Inference-Header-Content-Length` bytes followed by raw little-endian row-major tensors, each
input's length in its `parameters.binary_data_size`, in the order of the inputs. Responses use
the same layout when any output is binary.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import orjson

from service.api.oip.schemas import RequestInput
from service.bundle.spec import InputSpec
from service.engine.input_messages import LARGEST, feature
from service.engine.inputs import check_count, checked
from service.errors import InvalidInputError, shown_name

HEADER = "Inference-Header-Content-Length"
NP_DTYPES = {
    "FP16": "<f2", "FP32": "<f4", "FP64": "<f8", "INT64": "<i8", "INT32": "<i4", "BOOL": "|b1",
}  # fmt: skip
FLOAT_INPUTS = ("FP32", "FP64", "FP16")
# A token-id model (int64 inputs, no tokenizer) takes its ids as integers too (it was FP32 only,
# though a Triton user sends ids as INT64); floats stay accepted, whole numbers only.
ID_INPUTS = ("INT64", "INT32", *FLOAT_INPUTS)


def input_datatype(spec: InputSpec) -> str:
    """The datatype model metadata declares for a numeric input."""
    return "INT64" if spec.dtype == "int64" else "FP32"


def split(raw: bytes, header_length: int | None) -> tuple[bytes, memoryview]:
    """(JSON header, binary tail) of a request body."""
    if header_length is None:
        return raw, memoryview(b"")
    if header_length > len(raw):
        raise InvalidInputError(
            f"{HEADER} is {header_length} but the body holds only {len(raw)} bytes"
        )
    return raw[:header_length], memoryview(raw)[header_length:]


def _numbers(data: list[Any], name: str) -> list[float | int]:
    """Flatten nested `data` row-major, refusing anything but numbers (true/false included).
    The slow way, for irregular nesting and to name the first bad value."""
    flat: list[float | int] = []

    def walk(node: list[Any]) -> None:
        for v in node:
            if type(v) is float or type(v) is int:
                flat.append(v)
            elif type(v) is list:
                walk(v)
            else:
                raise InvalidInputError(
                    f"input '{name}': data must hold numbers only (flat or nested), got {v!r:.40}"
                )

    walk(data)
    return flat


def _only_numbers(v: list[Any]) -> bool:
    """Only ints, floats and lists of them (a set of the element types, built in C)."""
    types = set(map(type, v))
    if not types <= {int, float, list}:
        return False
    return list not in types or all(_only_numbers(x) for x in v if type(x) is list)


def _from_data(data: list[Any], name: str, shape: list[int], spec: InputSpec) -> np.ndarray:
    """float64 of `shape` from JSON `data`: numpy converts regular nesting in C; the walk in
    Python runs only for irregular nesting or to name what is wrong."""
    count = math.prod(shape)
    # Row-major, flat or nested as the shape is: [64, 2] nesting of a [2, 1, 8, 8] tensor (the
    # images transposed) was reshaped and answered; /v1 refused it.
    fix = "nest it as the shape is, or send it flat (row-major)"
    if _only_numbers(data):
        try:
            arr = np.asarray(data, dtype=np.float64)
        except (ValueError, OverflowError):
            arr = None  # irregular nesting, or an int too large: the slow way says which
        if arr is not None and arr.size == count:
            if arr.ndim > 1 and arr.shape != tuple(shape):
                raise InvalidInputError(
                    f"input '{name}': data is nested as {list(arr.shape)}, its shape is "
                    f"{shape}; {fix}"
                )
            return arr.reshape(shape)
    flat = _numbers(data, name)
    if len(flat) != count:
        raise InvalidInputError(
            f"input '{name}': shape {shape} holds {count} values but data has {len(flat)}"
        )
    if any(type(x) is list for x in data) and not _nested_as(data, shape):
        raise InvalidInputError(
            f"input '{name}': data is nested unevenly, its shape is {shape}; {fix}"
        )
    try:
        return np.asarray(flat, dtype=np.float64).reshape(shape)
    except OverflowError:  # as /v1 says it (it was "not an array of numbers")
        k = _overflowing(flat)
        per = count // shape[0]
        raise InvalidInputError(
            f"input '{name}': instance {k // per}, {feature(spec, k % per)}: an integer of "
            f"about {int(abs(int(flat[k])).bit_length() * 0.30103)} digits is beyond what the "
            f"model's {spec.dtype} inputs hold (magnitude at most {LARGEST[spec.dtype]:g}); "
            "check the value and its unit"
        ) from None


def _nested_as(data: list[Any], shape: list[int]) -> bool:
    """Whether nested lists follow `shape` exactly (the slow path only: irregular data)."""
    if not shape or len(data) != shape[0]:
        return False
    if len(shape) == 1:
        return all(type(x) is not list for x in data)
    return all(type(x) is list and _nested_as(x, shape[1:]) for x in data)


def _overflowing(flat: list[float | int]) -> int:
    for i, v in enumerate(flat):
        try:
            float(v)
        except OverflowError:
            return i
    return 0


def _check_shape(inp: RequestInput, spec: InputSpec) -> None:
    if inp.shape[1:] != spec.shape or len(inp.shape) != 1 + len(spec.shape) or inp.shape[0] < 1:
        want = ", ".join(str(d) for d in spec.shape)
        raise InvalidInputError(
            f"input '{inp.name}': shape {inp.shape} does not fit the model; expected "
            f"[B, {want}] with B >= 1 instances"
        )


def _names(inputs: list[RequestInput]) -> str:
    """The inputs' names for an error: a few, each cut (a 200 kB name made a 200 kB answer)."""
    more = f" and {len(inputs) - 5} more" if len(inputs) > 5 else ""
    return f"{[shown_name(i.name) for i in inputs[:5]]}{more}"


def decode_input(
    inputs: list[RequestInput], binary: memoryview, spec: InputSpec, max_instances: int
) -> np.ndarray:
    """The request's one input as float32 [B, *shape], checked like /v1 instances."""
    if len(inputs) != 1:
        raise InvalidInputError(f"the model takes one input, '{spec.name}'; got {_names(inputs)}")
    (inp,) = inputs
    if inp.name != spec.name:
        raise InvalidInputError(
            f"unknown input '{shown_name(inp.name)}'; the model takes one input, '{spec.name}'"
        )
    if inp.datatype not in (ID_INPUTS if spec.dtype == "int64" else FLOAT_INPUTS):
        raise InvalidInputError(
            f"input '{inp.name}': datatype {inp.datatype} is not supported; send "
            + (
                "INT64 token ids"
                if spec.dtype == "int64"
                else "FP32 (FP64 and FP16 are cast to FP32)"
            )
        )
    _check_shape(inp, spec)
    check_count(inp.shape[0], max_instances)  # before a byte is converted
    count = math.prod(inp.shape)
    size = inp.parameters.binary_data_size if inp.parameters else None
    if size is not None:
        if inp.data is not None:
            raise InvalidInputError(
                f"input '{inp.name}': give either data or parameters.binary_data_size, not both"
            )
        dtype = np.dtype(NP_DTYPES[inp.datatype])
        if size != count * dtype.itemsize:
            raise InvalidInputError(
                f"input '{inp.name}': binary_data_size is {size} bytes but shape {inp.shape} of "
                f"{inp.datatype} needs {count * dtype.itemsize}"
            )
        if len(binary) != size:
            raise InvalidInputError(
                f"the body holds {len(binary)} bytes after the JSON header but the inputs' "
                f"binary_data_size add up to {size}"
            )
        # A view of the body, no copy; FP32 is checked as it is, FP16 widened to FP32 (exact),
        # FP64 checked in FP64 (a range check before the cast that could round into range).
        arr = np.frombuffer(binary, dtype=dtype).reshape(inp.shape)
        if inp.datatype == "FP16":
            arr = arr.astype(np.float32)
    else:
        if inp.data is None:
            raise InvalidInputError(
                f"input '{inp.name}' has no data: give data, or binary_data_size and the bytes "
                "after the JSON header"
            )
        if len(binary):
            raise InvalidInputError(
                f"the body holds {len(binary)} bytes after the JSON header that no input claims "
                "(set parameters.binary_data_size)"
            )
        arr = _from_data(inp.data, inp.name, inp.shape, spec)
    # One checker for both protocols: finiteness and each model's valid ranges.
    return checked(arr, spec)


def encode(
    head: dict[str, Any], outputs: list[tuple[str, str, np.ndarray, bool]]
) -> tuple[bytes, bytes]:
    """(JSON header, binary outputs in order) of a response; sets head['outputs']."""
    chunks: list[bytes] = []
    described = []
    for name, datatype, arr, binary in outputs:
        out: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(arr.shape)}
        if binary:
            raw = np.ascontiguousarray(arr, dtype=NP_DTYPES[datatype]).tobytes()
            out["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            out["data"] = arr.ravel().tolist()
        described.append(out)
    head["outputs"] = described
    return orjson.dumps(head), b"".join(chunks)
