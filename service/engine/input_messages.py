"""Messages for instances that do not convert (service/engine/inputs.py): the first thing
wrong, named by instance and feature (or element), its value quoted and cut."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from service.bundle.spec import InputSpec


def first_bad(instances: Sequence[Any], spec: InputSpec) -> str:
    """Find the first instance that does not convert, for a precise message."""
    for i, inst in enumerate(instances):
        try:
            a = np.asarray(inst, dtype=np.float64)
        except OverflowError:  # a JSON integer past float64's range (10**400)
            leaves = leaves_of(inst) if type(inst) is list else [inst]
            try:
                shape = list(np.asarray(inst, dtype=object).shape)
            except ValueError:  # ragged
                shape = []
            if shape != spec.shape and not flat_image(shape, spec):  # shape's wrong first
                return f"instance {i} is not an array of numbers of shape {spec.shape}"
            j = next(j for j, v in enumerate(leaves) if type(v) is int and huge(v))
            return (
                f"instance {i}, {feature(spec, j)}: an integer of about "
                f"{int(abs(leaves[j]).bit_length() * 0.30103)} digits is beyond what the "
                f"model's {spec.dtype} inputs hold (magnitude at most {LARGEST[spec.dtype]:g}); "
                "check the value and its unit"
            )
        except (ValueError, TypeError):
            return f"instance {i} is not an array of numbers of shape {spec.shape}"
        if list(a.shape) != spec.shape and not flat_image(a.shape, spec):
            return f"instance {i} has shape {list(a.shape)}, expected {spec.shape}{hint(spec)}"
    return f"instances must be arrays of numbers of shape {spec.shape}{hint(spec)}"


def huge(v: int) -> bool:
    try:
        float(v)
    except OverflowError:
        return True
    return False


def flat_image(shape: Sequence[int], spec: InputSpec) -> bool:
    """A flat instance of an image model's size: unambiguous, read row-major like its CSVs."""
    return len(spec.shape) > 1 and len(shape) == 1 and shape[0] == int(np.prod(spec.shape))


def hint(spec: InputSpec) -> str:
    if len(spec.shape) < 2:
        return ""
    names = " or an object keyed by its feature names" if spec.feature_names else ""
    return f" (or a flat list of {int(np.prod(spec.shape))} numbers, row-major{names})"


def leaves_of(v: Any) -> list[Any]:
    return [x for item in v for x in leaves_of(item)] if type(v) is list else [v]


def not_a_number(rows: Sequence[Any], spec: InputSpec) -> str:
    """The first element that is not a number, named (feature or element) and quoted as JSON."""
    for i, row in enumerate(rows):
        if type(row) is not list:  # a bare value, not an array: no feature to name
            names = " or an object keyed by its feature names" if spec.feature_names else ""
            return (
                f"instance {i} is {quote(row)}, not an array; this model takes an array of "
                f"numbers of shape {spec.shape}{names}"
            )
        for j, v in enumerate(leaves_of(row)):
            if type(v) is bool:
                return (
                    f"instance {i}, {feature(spec, j)}: true/false are not accepted; send a number"
                )
            if v is None:
                return f"instance {i}, {feature(spec, j)}: null is not a number; send a value"
            if type(v) is str:
                return (
                    f"instance {i}, {feature(spec, j)}: {quote(v)} is not a number; send "
                    "numbers unquoted"
                )
            if not isinstance(v, int | float):
                return f"instance {i}, {feature(spec, j)}: {type(v).__name__} is not a number"
    return first_bad(rows, spec)


QUOTE_CHARS = 40  # an error echoes this much of a value: enough to find it, never the body


def quote(v: Any) -> str:
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


# The largest magnitude each input dtype holds (int64's, as the float64 that is exact below it).
LARGEST = {"float32": float(np.finfo(np.float32).max), "int64": float(2**63 - 1024)}


def feature(spec: InputSpec, j: int) -> str:
    if spec.feature_names and j < len(spec.feature_names):  # an instance may hold too many
        return f"feature '{spec.feature_names[j]}'"
    return f"element {j}"
