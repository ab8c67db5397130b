"""mode=deterministic checks the model's output as the MC summary does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from nets import mlp
from torch import nn

from service.bundle import load_bundle
from service.engine.model import ServedModel
from service.engine.params import PredictParams
from service.engine.summaries import SummaryError
from service.packaging import save


class LogInput(nn.Module):
    """NaN for an input <= 0 (no valid range declared): a model can make NaN from an input."""

    def __init__(self) -> None:
        super().__init__()
        self.body = mlp(0.25)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(torch.log(x))


def test_nan_logits_are_an_error_not_null_probabilities(tmp_path: Path) -> None:
    """The deterministic path answered 200 with null probabilities and a label from NaN (the
    MC path refused the same input as unusable output)."""
    torch.manual_seed(0)
    dest = save(
        LogInput().eval(), torch.rand(4, 6) + 0.5, out_dir=tmp_path, name="m", version="1",
        task="classification", labels=["a", "b"], intended_use="tests",
    )  # fmt: skip
    model = ServedModel(load_bundle(dest), device="cpu")  # the probe's NaN agree: it loads
    good = np.full((1, 6), 0.5, dtype=np.float32)
    assert np.isfinite(model.deterministic(good).point).all()
    bad = np.full((1, 6), -1.0, dtype=np.float32)
    for mode in ("deterministic", "mc"):
        with pytest.raises(SummaryError) as err:
            model.predict(bad, PredictParams(samples=4, confidence=(0.9,), mode=mode))
        assert err.value.message == (
            "logits contain NaN or infinite values; the model output is unusable"
        )
