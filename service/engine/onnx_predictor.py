"""Deterministic ("inference-mode") prediction on ONNX Runtime.

Dropout is off: onnxruntime's own optimiser removes Dropout nodes, which is exactly the
weight-scaling approximation we want here. MC sampling stays on the torch sampler, whose masks
are replayable; onnxruntime's Dropout keeps one generator per session and could not be.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from service.errors import ModelError

INPUT_NAME = "input"
OUTPUT_NAME = "output"


def export_onnx(
    module: nn.Module,
    example: torch.Tensor,
    path: Path,
    opset: int = 20,
    *,
    dynamic_length: bool = False,
) -> None:
    """Export `module` in eval mode with a dynamic batch dimension (and, for a text model with
    length buckets, a dynamic sequence axis up to the example's length)."""
    module.eval()
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    dims: dict[int, Any] = {0: batch}
    if dynamic_length:
        dims[1] = torch.export.Dim("length", min=1, max=int(example.shape[1]))
    # The exporter prints progress lines; keep the service's own output clean.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        # The exporter's own deprecation noise is not actionable for users of mcserve.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            torch.onnx.export(
                module,
                (example,),
                str(path),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=(dims,),
                opset_version=opset,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
        except Exception as exc:  # the exporter raises many types; all mean "cannot export"
            raise ModelError(f"the model cannot be exported to ONNX: {exc}") from exc


def cuda_available() -> bool:
    return "CUDAExecutionProvider" in ort.get_available_providers()


class OnnxPredictor:
    """One InferenceSession; `predict` takes [B, *input_shape] (float32, or int64 token ids)."""

    def __init__(self, path: Path | bytes, *, threads: int = 1, device: str = "cpu") -> None:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda") and cuda_available():
            providers.insert(0, "CUDAExecutionProvider")
        model = str(path) if isinstance(path, Path) else path
        try:
            self.session = ort.InferenceSession(model, sess_options=opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ModelError(f"onnxruntime cannot load the graph: {exc}") from exc
        self.provider = self.session.get_providers()[0]
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ModelError(f"the ONNX graph must have one input, it has {len(inputs)}")
        self.input_name = inputs[0].name
        # A dynamic axis reads as a name (a string): a text graph's sequence axis with buckets.
        self.input_shape = tuple(inputs[0].shape[1:])
        self.dynamic_length = len(self.input_shape) == 1 and not isinstance(
            self.input_shape[0], int
        )
        # Token models take int64 ids; everything else float32.
        self.input_dtype = np.int64 if inputs[0].type == "tensor(int64)" else np.float32

    @property
    def device(self) -> str:
        return "cuda" if self.provider == "CUDAExecutionProvider" else "cpu"

    def predict(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=self.input_dtype)
        out = self.session.run(None, {self.input_name: x})[0]
        return np.asarray(out, dtype=np.float32)
