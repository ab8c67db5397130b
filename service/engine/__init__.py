"""The MC dropout engine: plain Python over numpy and torch, no HTTP (FastAPI is never imported).

Shapes are samples-first everywhere: a request's samples are ``[T, B, *output]``.
"""

from service.engine.masks import KeepRule, keep_bytes, keep_bytes_numpy
from service.engine.onnx_predictor import OnnxPredictor, export_onnx
from service.engine.sampler import MCRequest, MCSampler, SamplerStats, default_device
from service.engine.summaries import (
    ClassificationSummary,
    Interval,
    RegressionSummary,
    SummaryError,
    summarize_classification,
    summarize_regression,
)

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
