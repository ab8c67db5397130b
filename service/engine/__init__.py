"""The MC dropout engine: plain Python over numpy and torch, no HTTP (FastAPI is never imported).

Shapes are samples-first everywhere: a request's samples are ``[T, B, *output]``.

What a bundle's calibration changes at serve time lives here too (`calibrator`, `conformal`,
`referral`); fitting it is `service.calibration`, which sits above and imports the engine.

Exports load lazily (PEP 562), so `service.engine.sampler` can be used where onnxruntime or
pydantic are absent (e.g. `bench/gpu.py` on a bare GPU machine).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the type checker sees the real names; runtime imports them on first use
    from service.engine.masks import KeepRule, keep_bytes, keep_bytes_numpy
    from service.engine.onnx_predictor import OnnxPredictor, export_onnx
    from service.engine.regression import summarize_regression
    from service.engine.sampler import MCRequest, MCSampler, SamplerStats, default_device
    from service.engine.summaries import (
        ClassificationSummary,
        Interval,
        RegressionSummary,
        SummaryError,
        summarize_classification,
    )

_EXPORTS = {
    "KeepRule": "service.engine.masks",
    "keep_bytes": "service.engine.masks",
    "keep_bytes_numpy": "service.engine.masks",
    "OnnxPredictor": "service.engine.onnx_predictor",
    "export_onnx": "service.engine.onnx_predictor",
    "MCRequest": "service.engine.sampler",
    "MCSampler": "service.engine.sampler",
    "SamplerStats": "service.engine.sampler",
    "default_device": "service.engine.sampler",
    "ClassificationSummary": "service.engine.summaries",
    "Interval": "service.engine.summaries",
    "RegressionSummary": "service.engine.summaries",
    "SummaryError": "service.engine.summaries",
    "summarize_classification": "service.engine.summaries",
    "summarize_regression": "service.engine.regression",
}
__all__ = [
    "ClassificationSummary",
    "Interval",
    "KeepRule",
    "MCRequest",
    "MCSampler",
    "OnnxPredictor",
    "RegressionSummary",
    "SamplerStats",
    "SummaryError",
    "default_device",
    "export_onnx",
    "keep_bytes",
    "keep_bytes_numpy",
    "summarize_classification",
    "summarize_regression",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'service.engine' has no attribute {name!r}")
