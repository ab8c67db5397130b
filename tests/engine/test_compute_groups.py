"""Requests summarised as one group (service/engine/compute.py) answer what each gets alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.bundle import load_bundle
from service.engine.compute import Work, run
from service.engine.model import ServedModel
from service.engine.params import PredictParams
from service.engine.prediction import Prediction

DIABETES = Path(__file__).resolve().parents[2] / "models" / "diabetes" / "2"  # fixed noise_var


@pytest.fixture(scope="module")
def diabetes() -> ServedModel:
    return ServedModel(load_bundle(DIABETES), device="cpu")


def _answer(model: ServedModel, x: np.ndarray, params: PredictParams) -> Work:
    return Work(x, params, model.mc_request(x, params))


@pytest.mark.parametrize("interval", ["quantile", "gaussian"])
def test_same_seed_requests_in_one_batch_answer_as_alone(
    diabetes: ServedModel, interval: str
) -> None:
    """Quantile intervals of a regressor with noise draw from the request's seed: two requests
    with the same seed were grouped and the second got the draws of the group's second input."""
    assert diabetes.manifest.aleatoric.noise_var > 0
    rng = np.random.default_rng(0)
    xa, xb = (rng.normal(size=(n, 10)).astype(np.float32) for n in (2, 1))
    params = PredictParams(samples=100, confidence=(0.9,), seed=42, interval=interval)
    alone = run(diabetes, [_answer(diabetes, xb, params)])[0]
    together = run(diabetes, [_answer(diabetes, xa, params), _answer(diabetes, xb, params)])[1]
    assert isinstance(alone, Prediction) and isinstance(together, Prediction)
    for a, b in zip(alone.summary.intervals, together.summary.intervals, strict=True):
        assert np.array_equal(a.lower, b.lower) and np.array_equal(a.upper, b.upper)
    assert np.array_equal(alone.summary.mean, together.summary.mean)
