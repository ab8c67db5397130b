"""One real instance per bundled model (the first row of models/data/<name>-test.csv).

They make the OpenAPI examples work as given: /docs "Try it out" and schemathesis's explicit
phase send them unchanged. Feature names and shapes come from each model's manifest.
"""

from __future__ import annotations

from typing import Any

ROWS: dict[str, list[float]] = {
    "breast-cancer": [
        17.99,
        10.38,
        122.8,
        1001.0,
        0.1184,
        0.2776,
        0.3001,
        0.1471,
        0.2419,
        0.07871,
        1.095,
        0.9053,
        8.589,
        153.4,
        0.006399,
        0.04904,
        0.05373,
        0.01587,
        0.03003,
        0.006193,
        25.38,
        17.33,
        184.6,
        2019.0,
        0.1622,
        0.6656,
        0.7119,
        0.2654,
        0.4601,
        0.1189,
    ],
    "diabetes": [48.0, 1.0, 21.6, 87.0, 183.0, 103.2, 70.0, 3.0, 3.8918, 69.0],
    "digits": [
        0.0,
        0.0,
        12.0,
        10.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        14.0,
        16.0,
        16.0,
        14.0,
        0.0,
        0.0,
        0.0,
        0.0,
        13.0,
        16.0,
        15.0,
        10.0,
        1.0,
        0.0,
        0.0,
        0.0,
        11.0,
        16.0,
        16.0,
        7.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        4.0,
        7.0,
        16.0,
        7.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        4.0,
        16.0,
        9.0,
        0.0,
        0.0,
        0.0,
        5.0,
        4.0,
        12.0,
        16.0,
        4.0,
        0.0,
        0.0,
        0.0,
        9.0,
        16.0,
        16.0,
        10.0,
        0.0,
        0.0,
    ],
}

SHAPES: dict[str, list[int]] = {"breast-cancer": [30], "diabetes": [10], "digits": [1, 8, 8]}
PARAMETERS: dict[str, Any] = {"samples": 100, "seed": 42}


def _nest(flat: list[float], shape: list[int]) -> Any:
    if len(shape) == 1:
        return flat
    step = len(flat) // shape[0]
    return [_nest(flat[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0])]


def instance(model: str) -> Any:
    """The model's example row nested to its input shape (a /v1 instance)."""
    return _nest(ROWS[model], SHAPES[model])


def names() -> dict[str, Any]:
    """OpenAPI examples of the `name` path parameter, in the same order as the bodies."""
    return {m: {"summary": m, "value": m} for m in ROWS}


VERSIONS: dict[str, Any] = {"1": {"summary": "version 1", "value": "1"}}


def predict() -> dict[str, Any]:
    """One /v1 :predict body per bundled model."""
    return {
        m: {
            "summary": f"{m}: one instance of shape {SHAPES[m]}, 100 passes, seeded",
            "value": {"instances": [instance(m)], "parameters": PARAMETERS},
        }
        for m in ROWS
    }


def infer() -> dict[str, Any]:
    """One /v2 infer body per bundled model (JSON tensor data, flat)."""
    return {
        m: {
            "summary": f"{m}: one FP32 instance of shape {SHAPES[m]}, 100 passes, seeded",
            "value": {
                "id": f"example-{m}",
                "inputs": [
                    {"name": "input", "shape": [1, *SHAPES[m]], "datatype": "FP32", "data": row}
                ],
                "parameters": PARAMETERS,
            },
        }
        for m, row in ROWS.items()
    }
