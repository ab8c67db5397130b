"""Schemathesis hooks that steer generated requests towards the bundled models (shared by the
fuzz test and the parity test; a hook is known by its function name)."""

from __future__ import annotations

from typing import Any

import schemathesis
from hypothesis import strategies as st

from service.api.common import examples
from service.api.oip.outputs import CLASS_SCORES, REGRESSION

LENGTH = "Inference-Header-Content-Length"
MODELS = list(examples.ROWS)
OUTPUTS = {
    "breast-cancer": ["probabilities", "probability_std", "label", *CLASS_SCORES],
    "diabetes": ["mean", *REGRESSION],
    "digits": ["probabilities", "probability_std", "label", *CLASS_SCORES],
}


def flatmap_path_parameters(
    context: schemathesis.HookContext, path_parameters: dict[str, Any] | None
) -> st.SearchStrategy[dict[str, Any] | None]:
    """Random model names only reach the 404: two thirds name a bundled model (version 1)."""
    if not path_parameters or "name" not in path_parameters:
        return st.just(path_parameters)
    real = {k: "1" for k in path_parameters if k == "version"}
    named = st.sampled_from(MODELS).map(lambda m: {**path_parameters, **real, "name": m})
    return st.one_of(named, named, st.just(path_parameters))


def flatmap_headers(
    context: schemathesis.HookContext, headers: dict[str, Any] | None
) -> st.SearchStrategy[dict[str, Any] | None]:
    """A random Inference-Header-Content-Length cuts the JSON anywhere: keep it in a quarter."""
    if not headers or LENGTH not in headers:
        return st.just(headers)
    rest = {k: v for k, v in headers.items() if k != LENGTH}
    return st.sampled_from([headers, rest, rest, rest])


def _valid(case: schemathesis.Case, rows: int, outputs: list[str] | None, binary: bool) -> Any:
    name = case.path_parameters["name"]
    row, shape = examples.ROWS[name], examples.SHAPES[name]
    if "instances" in case.body:
        case.body["instances"] = [examples.instance(name)] * rows
        return case
    case.body["inputs"] = [
        {"name": "input", "shape": [rows, *shape], "datatype": "FP32", "data": row * rows}
    ]
    if outputs is None:
        case.body.pop("outputs", None)
    else:
        case.body["outputs"] = [{"name": o, "parameters": {"binary_data": binary}} for o in outputs]
    return case


def flatmap_case(
    context: schemathesis.HookContext, case: schemathesis.Case
) -> st.SearchStrategy[schemathesis.Case]:
    """Two thirds of the bodies for a bundled model get valid inputs (and real output names), so the
    parameters, the output choice and both codecs are exercised past the input checks."""
    name = (case.path_parameters or {}).get("name")
    body = case.body
    if name not in examples.ROWS or not isinstance(body, dict):
        return st.just(case)
    if "instances" not in body and "inputs" not in body:
        return st.just(case)
    outputs = st.one_of(
        st.none(), st.lists(st.sampled_from(OUTPUTS[name]), min_size=1, unique=True)
    )
    valid = st.builds(_valid, st.just(case), st.integers(1, 3), outputs, st.booleans())
    return st.one_of(st.just(case), valid, valid)
