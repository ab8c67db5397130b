"""Turn client instances into one float32 array, or say exactly what is wrong with them.

Cost: a request body is parsed and converted while holding the GIL (pydantic's and numpy's C
code), so the work a body can cause is bounded before it is parsed: `check_size` counts the
body's separators (a C scan, 2.5 ms for 5 MB) against what `max_instances` instances of the
model's shape can need. Measured: a 5.2 MB body of 1.3 M one-number instances took 0.59 s to
parse and 0.15 s more to convert, all of it on the event loop, before its 413.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from service.bundle.spec import InputSpec
from service.engine.input_messages import (
    LARGEST,
    feature,
    first_bad,
    flat_image,
    not_a_number,
)
from service.errors import InvalidInputError, PayloadTooLargeError, shown_name

MAX_NAMED = 20  # a model's feature names an error lists in full, at most


def _few(names: Sequence[str], n: int = 5) -> str:
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return f"{list(names[:n])}{more}"


def _from_objects(instances: Sequence[Any], spec: InputSpec) -> list[list[Any]]:
    names = spec.feature_names
    if names is None:
        raise InvalidInputError(
            "this model's input has no feature names: send each instance as an array of shape "
            f"{spec.shape}"
        )
    want = set(names)
    rows = []
    for i, inst in enumerate(instances):
        missing = [n for n in names if n not in inst]
        unknown = sorted(set(inst) - want)
        if missing or unknown:
            # The client's keys first, a few, each cut (a 5 MB key made a 5 MB answer); the
            # model's names a few too: an image's 3,072 made an 82 kB message, twice over.
            parts = []
            if unknown:
                parts.append(f"unknown {_few([shown_name(k) for k in unknown])}")
            if missing:
                parts.append(f"missing {_few(missing)}")
            expected = f"exactly {names}"
            if len(names) > MAX_NAMED:
                expected = f"the model's {len(names)} features (GET /v1/models/{{name}} lists them)"
            raise InvalidInputError(
                f"instance {i}: {'; '.join(parts)} feature(s); expected {expected}"
            )
        rows.append([inst[n] for n in names])
    return rows


# Not numbers, though numpy would take them: "59" -> 59.0 and null -> NaN. One rule for inputs
# and parameters alike: numbers are sent as JSON numbers, never in strings (README, "Errors").
_NOT_NUMBERS = frozenset({bool, str, type(None)})


def _has_non_number(v: Any) -> bool:
    # A set of the element types is built in C: this runs on the event loop for every request.
    if type(v) in _NOT_NUMBERS:
        return True
    if type(v) is list:
        types = set(map(type, v))
        if not types.isdisjoint(_NOT_NUMBERS):
            return True
        if list in types:
            return any(_has_non_number(x) for x in v if type(x) is list)
    return False


def value_bound(spec: InputSpec, max_instances: int) -> int:
    """Twice the separators (`,` `[` `{`) that `max_instances` instances of `spec` can hold in
    JSON, as arrays or objects, plus room for the request's other fields (parameters, the /v2
    header's shape, outputs and id)."""
    dims = spec.shape
    brackets = sum(math.prod(dims[:k]) for k in range(len(dims)))  # the nested lists' "["
    as_array = math.prod(dims) - 1 + brackets
    names = spec.feature_names or []
    as_object = len(names) + sum(n.count(",") + n.count("[") + n.count("{") for n in names)
    return 2 * max_instances * (max(as_array, as_object) + 1) + 1024


def check_size(raw: bytes, spec: InputSpec, max_instances: int) -> None:
    """Refuse a JSON body with more separators than a valid request can have, before parsing
    it (PayloadTooLargeError): what a body may cost is then bounded by what a valid one costs."""
    bound = value_bound(spec, max_instances)
    if len(raw) <= bound:  # fewer bytes than the bound: fewer separators too
        return
    count = raw.count(b",") + raw.count(b"[") + raw.count(b"{")
    if count > bound:  # a text's own commas are no values: count again, outside the strings
        count = separators_outside_strings(raw)
    if count > bound:
        what = "texts" if spec.text is not None else f"instances of shape {spec.shape}"
        raise PayloadTooLargeError(
            f"the body holds {count} JSON values and arrays, more than {max_instances} {what} "
            f"can need ({bound}; setting max_instances): split the request, or check the "
            "instances' shape"
        )


def separators_outside_strings(raw: bytes) -> int:
    """The `,` `[` `{` of a JSON body that are not inside its strings, in a few vectorized passes
    over runs of backslashes: 8-46 ms and at most 108 MiB for 8 MB bodies here, the worst made of
    escaped quotes (bench/separators.py; a regular expression took 400 ms for many short
    strings). Invalid JSON gets some count; its parse refuses it next."""
    b = np.frombuffer(raw, np.uint8)
    quote = b == ord('"')
    backslash = (b == ord("\\")).view(np.int8)
    if backslash.any():  # the character after an odd run of backslashes is escaped
        edges = np.diff(backslash, prepend=np.int8(0), append=np.int8(0))
        starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        escaped = ends[(ends - starts) % 2 == 1]
        quote[escaped[escaped < b.size]] = False
    inside = np.bitwise_xor.accumulate(quote.view(np.uint8))  # 1 from an opening quote on
    sep = (b == ord(",")) | (b == ord("[")) | (b == ord("{"))
    return int(np.count_nonzero(sep & (inside == 0)))


def check_count(count: int, max_instances: int) -> None:
    if count > max_instances:
        raise PayloadTooLargeError(
            f"{count} instances in one request; the limit is {max_instances} "
            "(setting max_instances): split the request"
        )


def to_array(instances: Sequence[Any], spec: InputSpec, max_instances: int) -> np.ndarray:
    """[B, *shape] float32; checks count, shape, numbers, finiteness and hard valid ranges."""
    if not isinstance(instances, list) or not instances:
        raise InvalidInputError("'instances' must be a non-empty list")
    check_count(len(instances), max_instances)
    rows: Sequence[Any] = instances
    kinds = {isinstance(inst, dict) for inst in instances}
    if len(kinds) > 1:
        raise InvalidInputError(
            "instances mix objects and arrays; send all as arrays or all as objects"
        )
    if isinstance(instances[0], dict):
        rows = _from_objects(instances, spec)
    if any(_has_non_number(r) for r in rows):
        raise InvalidInputError(not_a_number(rows, spec))
    try:
        arr = np.asarray(rows, dtype=np.float64)
    except (ValueError, TypeError, OverflowError):
        # Objects: name the feature whose value is not a number (an object, say).
        explain = not_a_number if isinstance(instances[0], dict) else first_bad
        raise InvalidInputError(explain(rows, spec)) from None
    if arr.ndim == 2 and flat_image(arr.shape[1:], spec):  # flat lists or feature-keyed objects
        arr = arr.reshape(arr.shape[0], *spec.shape)
    if list(arr.shape[1:]) != spec.shape:
        raise InvalidInputError(first_bad(rows, spec))
    return checked(arr, spec)


def checked(arr: np.ndarray, spec: InputSpec) -> np.ndarray:
    """[B, *shape] float32 from numbers already of that shape (float64 or float32): checks
    finiteness and the hard valid ranges. numpy releases the GIL in these loops."""
    flat = arr.reshape(arr.shape[0], -1)
    bounds = _bounds(spec, flat.shape[1])
    # One test for the common case, valid inputs (NaN fails both comparisons); the precise
    # message is worked out only when something is wrong.
    if bounds is not None and bounds[2] and bool(((flat >= bounds[0]) & (flat <= bounds[1])).all()):
        return _cast(arr, spec)  # bounds the dtype holds: an Infinity would have failed too
    bad = ~np.isfinite(flat)
    if bad.any():
        i, j = (int(v) for v in np.argwhere(bad)[0])
        raise InvalidInputError(
            f"instance {i}, {feature(spec, j)}: NaN and Infinity are not valid inputs"
        )
    # 1e39 is finite in float64 but infinite in float32: the answer's numbers came back null.
    over = np.abs(flat) > LARGEST[spec.dtype]
    if over.any():
        i, j = (int(v) for v in np.argwhere(over)[0])
        raise InvalidInputError(
            f"instance {i}, {feature(spec, j)} = {flat[i, j]:g} is beyond what the model's "
            f"{spec.dtype} inputs hold (magnitude at most {LARGEST[spec.dtype]:g}); check the "
            "value and its unit"
        )
    _check_ranges(flat, spec)
    return _cast(arr, spec)


def _cast(arr: np.ndarray, spec: InputSpec) -> np.ndarray:
    """float32, or int64 token ids (whole numbers only: 3.5 is no token)."""
    if spec.dtype == "float32":
        return arr.astype(np.float32)
    frac = arr != np.floor(arr)
    if frac.any():
        i, j = (int(v) for v in np.argwhere(frac.reshape(arr.shape[0], -1))[0])
        raise InvalidInputError(f"instance {i}, element {j}: token ids are whole numbers")
    return arr.astype(np.int64)


_BOUNDS: dict[int, tuple[InputSpec, np.ndarray, np.ndarray, bool]] = {}


def _bounds(spec: InputSpec, width: int) -> tuple[np.ndarray, np.ndarray, bool] | None:
    """The hard valid range per feature and whether the input's dtype holds all of it (then an
    input inside it needs no other check), built once per spec (not on every request)."""
    cached = _BOUNDS.get(id(spec))
    if cached is not None and cached[0] is spec:
        return cached[1], cached[2], cached[3]
    if spec.valid_ranges:
        lo = np.array([r[0] for r in spec.valid_ranges])
        hi = np.array([r[1] for r in spec.valid_ranges])
    elif spec.value_range:
        lo = np.full(width, spec.value_range[0])
        hi = np.full(width, spec.value_range[1])
    else:
        return None
    if len(_BOUNDS) > 1024:  # specs of unloaded models: forget them all, rebuild on use
        _BOUNDS.clear()
    most = LARGEST[spec.dtype]  # NaN and Infinity fail these too
    finite = bool((np.abs(lo) <= most).all() and (np.abs(hi) <= most).all())
    _BOUNDS[id(spec)] = (spec, lo, hi, finite)
    return lo, hi, finite


def _check_ranges(flat: np.ndarray, spec: InputSpec) -> None:
    bounds = _bounds(spec, flat.shape[1])
    if bounds is None:
        return
    lo, hi, _ = bounds
    bad = (flat < lo) | (flat > hi)
    if bad.any():
        i, j = (int(v) for v in np.argwhere(bad)[0])
        unit = f" {spec.units[j]}" if spec.units and spec.units[j] else ""
        raise InvalidInputError(
            f"instance {i}, {feature(spec, j)} = {flat[i, j]:g} is outside the valid range "
            f"[{lo[j]:g}, {hi[j]:g}]{unit}; check the value and its unit"
        )
