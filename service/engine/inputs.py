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
from service.errors import InvalidInputError, PayloadTooLargeError, shown_name


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
            parts = []
            if missing:
                parts.append(f"missing {missing}")
            if unknown:  # the client's keys: a few, each cut (a 5 MB key made a 5 MB answer)
                more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
                parts.append(f"unknown {[shown_name(k) for k in unknown[:5]]}{more}")
            raise InvalidInputError(
                f"instance {i}: {'; '.join(parts)} feature(s); expected exactly {names}"
            )
        rows.append([inst[n] for n in names])
    return rows


def _first_bad(instances: Sequence[Any], spec: InputSpec) -> str:
    """Find the first instance that does not convert, for a precise message."""
    for i, inst in enumerate(instances):
        try:
            a = np.asarray(inst, dtype=np.float64)
        except OverflowError:  # a JSON integer past float64's range (10**400)
            leaves = _leaves(inst) if type(inst) is list else [inst]
            try:
                shape = list(np.asarray(inst, dtype=object).shape)
            except ValueError:  # ragged
                shape = []
            if shape != spec.shape and not _flat_image(shape, spec):  # shape's wrong first
                return f"instance {i} is not an array of numbers of shape {spec.shape}"
            j = next(j for j, v in enumerate(leaves) if type(v) is int and _huge(v))
            return (
                f"instance {i}, {_feature(spec, j)}: an integer of about "
                f"{int(abs(leaves[j]).bit_length() * 0.30103)} digits is beyond what the "
                f"model's {spec.dtype} inputs hold (magnitude at most {LARGEST[spec.dtype]:g}); "
                "check the value and its unit"
            )
        except (ValueError, TypeError):
            return f"instance {i} is not an array of numbers of shape {spec.shape}"
        if list(a.shape) != spec.shape and not _flat_image(a.shape, spec):
            return f"instance {i} has shape {list(a.shape)}, expected {spec.shape}{_hint(spec)}"
    return f"instances must be arrays of numbers of shape {spec.shape}{_hint(spec)}"


def _huge(v: int) -> bool:
    try:
        float(v)
    except OverflowError:
        return True
    return False


def _flat_image(shape: Sequence[int], spec: InputSpec) -> bool:
    """A flat instance of an image model's size: unambiguous, read row-major like its CSVs."""
    return len(spec.shape) > 1 and len(shape) == 1 and shape[0] == int(np.prod(spec.shape))


def _hint(spec: InputSpec) -> str:
    if len(spec.shape) < 2:
        return ""
    names = " or an object keyed by its feature names" if spec.feature_names else ""
    return f" (or a flat list of {int(np.prod(spec.shape))} numbers, row-major{names})"


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


def _leaves(v: Any) -> list[Any]:
    return [x for item in v for x in _leaves(item)] if type(v) is list else [v]


def _not_a_number(rows: Sequence[Any], spec: InputSpec) -> str:
    """The first element that is not a number, named (feature or element) and quoted as JSON."""
    for i, row in enumerate(rows):
        if type(row) is not list:  # a bare value, not an array: no feature to name
            names = " or an object keyed by its feature names" if spec.feature_names else ""
            return (
                f"instance {i} is {_quote(row)}, not an array; this model takes an array of "
                f"numbers of shape {spec.shape}{names}"
            )
        for j, v in enumerate(_leaves(row)):
            if type(v) is bool:
                return (
                    f"instance {i}, {_feature(spec, j)}: true/false are not accepted; send a number"
                )
            if v is None:
                return f"instance {i}, {_feature(spec, j)}: null is not a number; send a value"
            if type(v) is str:
                return (
                    f"instance {i}, {_feature(spec, j)}: {_quote(v)} is not a number; send "
                    "numbers unquoted"
                )
            if not isinstance(v, int | float):
                return f"instance {i}, {_feature(spec, j)}: {type(v).__name__} is not a number"
    return _first_bad(rows, spec)


QUOTE_CHARS = 40  # an error echoes this much of a value: enough to find it, never the body


def _quote(v: Any) -> str:
    """A value for an error message: strings quoted and cut, others named by their JSON type."""
    if type(v) is str:
        if len(v) <= QUOTE_CHARS:
            return f"the string {v!r}"
        return f"the string {v[:QUOTE_CHARS]!r}... ({len(v)} characters)"
    if v is None:
        return "null"
    if type(v) is bool:
        return "true/false"
    return "a number" if isinstance(v, int | float) else "an object"


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
        raise InvalidInputError(_not_a_number(rows, spec))
    try:
        arr = np.asarray(rows, dtype=np.float64)
    except (ValueError, TypeError, OverflowError):
        # Objects: name the feature whose value is not a number (an object, say).
        explain = _not_a_number if isinstance(instances[0], dict) else _first_bad
        raise InvalidInputError(explain(rows, spec)) from None
    if arr.ndim == 2 and _flat_image(arr.shape[1:], spec):  # flat lists or feature-keyed objects
        arr = arr.reshape(arr.shape[0], *spec.shape)
    if list(arr.shape[1:]) != spec.shape:
        raise InvalidInputError(_first_bad(rows, spec))
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
            f"instance {i}, {_feature(spec, j)}: NaN and Infinity are not valid inputs"
        )
    # 1e39 is finite in float64 but infinite in float32: the answer's numbers came back null.
    over = np.abs(flat) > LARGEST[spec.dtype]
    if over.any():
        i, j = (int(v) for v in np.argwhere(over)[0])
        raise InvalidInputError(
            f"instance {i}, {_feature(spec, j)} = {flat[i, j]:g} is beyond what the model's "
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


def _feature(spec: InputSpec, j: int) -> str:
    if spec.feature_names and j < len(spec.feature_names):  # an instance may hold too many
        return f"feature '{spec.feature_names[j]}'"
    return f"element {j}"


_BOUNDS: dict[int, tuple[InputSpec, np.ndarray, np.ndarray, bool]] = {}
# The largest magnitude each input dtype holds (int64's, as the float64 that is exact below it).
LARGEST = {"float32": float(np.finfo(np.float32).max), "int64": float(2**63 - 1024)}


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
            f"instance {i}, {_feature(spec, j)} = {flat[i, j]:g} is outside the valid range "
            f"[{lo[j]:g}, {hi[j]:g}]{unit}; check the value and its unit"
        )
