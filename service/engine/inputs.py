"""Turn client instances into one float32 array, or say exactly what is wrong with them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from service.bundle.manifest import InputSpec
from service.errors import InvalidInputError, PayloadTooLargeError


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
            if unknown:
                parts.append(f"unknown {unknown}")
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
        except (ValueError, TypeError, OverflowError):
            return f"instance {i} is not an array of numbers of shape {spec.shape}"
        if list(a.shape) != spec.shape and not _flat_image(a.shape, spec):
            return f"instance {i} has shape {list(a.shape)}, expected {spec.shape}{_hint(spec)}"
    return f"instances must be arrays of numbers of shape {spec.shape}{_hint(spec)}"


def _flat_image(shape: Sequence[int], spec: InputSpec) -> bool:
    """A flat instance of an image model's size: unambiguous, read row-major like its CSVs."""
    return len(spec.shape) > 1 and len(shape) == 1 and shape[0] == int(np.prod(spec.shape))


def _hint(spec: InputSpec) -> str:
    if len(spec.shape) < 2:
        return ""
    names = " or an object keyed by its feature names" if spec.feature_names else ""
    return f" (or a flat list of {int(np.prod(spec.shape))} numbers, row-major{names})"


def _has_bool(v: Any) -> bool:
    # A set of the element types is built in C: this runs on the event loop for every request.
    if type(v) is bool:
        return True
    if type(v) is list:
        types = set(map(type, v))
        if bool in types:
            return True
        if list in types:
            return any(_has_bool(x) for x in v if type(x) is list)
    return False


def to_array(instances: Sequence[Any], spec: InputSpec, max_instances: int) -> np.ndarray:
    """[B, *shape] float32; checks count, shape, numbers, finiteness and hard valid ranges."""
    if not isinstance(instances, list) or not instances:
        raise InvalidInputError("'instances' must be a non-empty list")
    if len(instances) > max_instances:
        raise PayloadTooLargeError(
            f"{len(instances)} instances in one request; the limit is {max_instances} "
            "(setting max_instances): split the request"
        )
    rows: Sequence[Any] = instances
    kinds = {isinstance(inst, dict) for inst in instances}
    if len(kinds) > 1:
        raise InvalidInputError(
            "instances mix objects and arrays; send all as arrays or all as objects"
        )
    if isinstance(instances[0], dict):
        rows = _from_objects(instances, spec)
    if any(_has_bool(r) for r in rows):
        raise InvalidInputError("inputs must be numbers; true/false are not accepted")
    try:
        arr = np.asarray(rows, dtype=np.float64)
    except (ValueError, TypeError, OverflowError):
        raise InvalidInputError(_first_bad(rows, spec)) from None
    if arr.ndim == 2 and _flat_image(arr.shape[1:], spec):  # flat lists or feature-keyed objects
        arr = arr.reshape(arr.shape[0], *spec.shape)
    if list(arr.shape[1:]) != spec.shape:
        raise InvalidInputError(_first_bad(rows, spec))
    flat = arr.reshape(arr.shape[0], -1)
    bounds = _bounds(spec, flat.shape[1])
    # One test for the common case, valid inputs (NaN fails both comparisons); the precise
    # message is worked out only when something is wrong.
    if bounds is not None and bounds[2] and bool(((flat >= bounds[0]) & (flat <= bounds[1])).all()):
        return arr.astype(np.float32)  # finite bounds: an Infinity would have failed too
    bad = ~np.isfinite(flat)
    if bad.any():
        i, j = (int(v) for v in np.argwhere(bad)[0])
        raise InvalidInputError(
            f"instance {i}, {_feature(spec, j)}: NaN and Infinity are not valid inputs"
        )
    _check_ranges(flat, spec)
    return arr.astype(np.float32)


def _feature(spec: InputSpec, j: int) -> str:
    if spec.feature_names:
        return f"feature '{spec.feature_names[j]}'"
    return f"element {j}"


_BOUNDS: dict[int, tuple[InputSpec, np.ndarray, np.ndarray, bool]] = {}


def _bounds(spec: InputSpec, width: int) -> tuple[np.ndarray, np.ndarray, bool] | None:
    """The hard valid range per feature and whether all of it is finite, built once per spec
    (not on every request)."""
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
    finite = bool(np.isfinite(lo).all() and np.isfinite(hi).all())
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
