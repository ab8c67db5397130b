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

from service.bundle.load import LoadedBundle
from service.bundle.spec import InputSpec
from service.engine import progress
from service.errors import BundleError, ModelError

INPUT_NAME = "input"
OUTPUT_NAME = "output"
# ONNX Runtime and torch run the same float32 network with other kernels (fused multiply-adds,
# other orders of summation), so their answers differ in the last bits: on the bundled models by
# at most 4e-6 (3e-6 relative). 1e-3 relative and 1e-4 absolute leave room for deeper networks
# and still refuse a graph that computes something else (a wrong weight or column is off by far
# more).
RTOL, ATOL = 1e-3, 1e-4
_ONNX_TYPES = {"float32": "tensor(float)", "int64": "tensor(int64)"}


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
        # torch's own LSTM/GRU set their flat weights while exported: a warning per save of a
        # recurrent model that asked the user to register buffers in torch's code
        warnings.filterwarnings("ignore", r"The tensor attributes .*_flat_weights", UserWarning)
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
        self.input_type = str(inputs[0].type)  # "tensor(float)", "tensor(int64)", ...
        self.input_dtype = np.int64 if self.input_type == "tensor(int64)" else np.float32

    @property
    def device(self) -> str:
        return "cuda" if self.provider == "CUDAExecutionProvider" else "cpu"

    def predict(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=self.input_dtype)
        try:
            out = self.session.run(None, {self.input_name: x})[0]
            progress.tick()  # a deterministic run counts as a forward (progress.py)
        except Exception as exc:  # onnxruntime's untyped errors: the graph's fault, said so
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            raise ModelError(f"the ONNX graph failed on {x.shape[0]} inputs ({first})") from exc
        if out.shape[:1] != x.shape[:1]:  # a graph that broadcast a fixed batch into its answer
            raise ModelError(
                f"the ONNX graph answered {list(out.shape)} for {x.shape[0]} inputs; a model "
                "answers one row per input"
            )
        return np.asarray(out, dtype=np.float32)


def probe_input(spec: InputSpec, rows: int = 2) -> np.ndarray:
    """A small deterministic input [rows, *shape] of the manifest's dtype, within its ranges
    (training ranges first, then valid ranges, then value_range); token ids are small ids."""
    n = spec.features
    frac = 0.2 + 0.6 * ((np.arange(rows * n).reshape(rows, n) * 0.618034) % 1.0)
    if spec.dtype == "int64":  # ids 1..5, within value_range
        lo, hi = spec.value_range or (0.0, float("inf"))
        ids = np.clip(1 + np.arange(rows * n).reshape(rows, n) % 5, np.ceil(lo), np.floor(hi))
        return ids.astype(np.int64).reshape(rows, *spec.shape)
    ranges = spec.training_ranges or spec.valid_ranges or [spec.value_range or (-1.0, 1.0)] * n
    low = np.array([r[0] for r in ranges], dtype=np.float64)
    high = np.array([r[1] for r in ranges], dtype=np.float64)
    finite = np.isfinite(low) & np.isfinite(high)
    with np.errstate(invalid="ignore"):  # the open ranges' (-inf) + 0 is not picked below
        out = np.where(finite, low + frac * np.where(finite, high - low, 0.0), 2.0 * frac - 1.0)
    out = np.clip(out, low, high)  # an open range: the unbounded pattern, within its finite end
    return out.astype(np.float32).reshape(rows, *spec.shape)


def disagreement(onnx: OnnxPredictor, module: nn.Module, spec: InputSpec) -> str:
    """Why the ONNX graph does not compute the module's eval-mode answer ("" when it does):
    another input type, or another output (shape or values) on `probe_input`. The graph serves
    mode=deterministic, the module the MC passes: a graph with 5 output columns for a
    1-output regressor served 5 means, one with 3 logits for 2 labels a 3-class softmax."""
    want = _ONNX_TYPES[spec.dtype]
    if onnx.input_type != want:
        return f"its input is {onnx.input_type}, but the manifest's inputs.dtype is {spec.dtype}"
    for rows in PROBE_ROWS:
        why = _disagreement(onnx, module, probe_input(spec, rows))
        if why:
            return why
    return ""


# A graph must answer any batch alike: one that added a [2, K] constant agreed at 2 rows only
# (1 input got 2 answers, 3 a 500). Each probe runs twice and must repeat itself bit for bit.
PROBE_ROWS = (2, 1, 3)


def _disagreement(onnx: OnnxPredictor, module: nn.Module, x: np.ndarray) -> str:
    first = next(iter([*module.parameters(), *module.buffers()]), None)
    device = first.device if first is not None else torch.device("cpu")
    try:
        with torch.inference_mode():
            ref = module.eval()(torch.as_tensor(x, device=device)).float().cpu().numpy()
        got = onnx.session.run(None, {onnx.input_name: x})[0]
        again = onnx.session.run(None, {onnx.input_name: x})[0]
    except Exception as exc:  # either runtime's error: the probe did not run
        return f"the probe input {list(x.shape)} did not run ({type(exc).__name__}: {exc})"
    got = np.asarray(got, dtype=np.float32)
    if not np.array_equal(got, np.asarray(again, dtype=np.float32), equal_nan=True):
        return f"two runs of the probe input {list(x.shape)} answered differently (random)"
    if got.shape != ref.shape:
        return (
            f"it outputs {list(got.shape)} for the probe input {list(x.shape)}, the "
            f"architecture and weights {list(ref.shape)}"
        )
    if not np.allclose(got, ref, rtol=RTOL, atol=ATOL, equal_nan=True):  # NaN: the same input
        worst = float(np.max(np.abs(got - ref)))
        return (
            f"its outputs differ from the architecture and weights' by up to {worst:.3g} on a "
            f"probe input (tolerance {RTOL:g} relative, {ATOL:g} absolute)"
        )
    return ""


def checked_predictor(bundle: LoadedBundle, threads: int = 1) -> OnnxPredictor:
    """The bundle's deterministic-path session, refused (BundleError) unless its graph takes
    the manifest's input and computes the module's eval-mode answer (`disagreement`)."""
    assert bundle.onnx_bytes is not None
    spec = bundle.manifest.inputs
    onnx = OnnxPredictor(bundle.onnx_bytes, threads=threads)
    arts = bundle.manifest.artifacts
    where = bundle.path / next((f for f, a in arts.items() if a.role == "onnx"), "model.onnx")
    shape = list(onnx.input_shape)
    if onnx.dynamic_length and spec.text is not None and spec.text.buckets:
        shape = spec.shape  # a dynamic sequence axis serves every bucket
    if shape != spec.shape:
        raise BundleError(
            f"{where}: input shape {list(onnx.input_shape)} does not match the manifest's "
            f"{spec.shape}"
        )
    why = disagreement(onnx, bundle.module, spec)
    if why:
        raise BundleError(
            f"{where}: the ONNX graph (the deterministic path) is not the bundle's model: "
            f"{why}; export it again from the same module and weights (save() does)"
        )
    return onnx
