"""The deterministic ONNX Runtime path equals torch's eval output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from nets import Residual, SmallCNN, mlp, trained_bn

from service.engine import OnnxPredictor, export_onnx


def test_onnx_equals_torch_eval(tmp_path: Path) -> None:
    torch.manual_seed(0)
    for i, (model, shape) in enumerate(
        [
            (mlp(0.25), (6,)),
            (trained_bn(SmallCNN(0.5), (1, 8, 8)), (1, 8, 8)),
            (Residual(), (6,)),
        ]
    ):
        x = torch.randn(9, *shape)
        path = tmp_path / f"m{i}.onnx"
        export_onnx(model, x[:2], path)
        pred = OnnxPredictor(path)
        with torch.inference_mode():
            expected = model.eval()(x).numpy()
        for batch in (x[:1], x):  # the batch dimension is dynamic
            got = pred.predict(batch.numpy())
            np.testing.assert_allclose(got, expected[: len(batch)], rtol=0, atol=1e-5)
        assert pred.input_shape == shape
