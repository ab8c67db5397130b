"""Calibrating and evaluating a learned-noise regressor: conformal scores are normalised by the
mixture's total std, referral gains an aleatoric threshold, evaluate scores the mixture's
density."""

from __future__ import annotations

import math
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest
import torch
from calib_repo import write_csv
from nets import mlp

from service.bundle import load_bundle
from service.calibration.data import read
from service.calibration.evaluation import evaluate
from service.calibration.recalibration import calibrate_bundle
from service.engine.model import ServedModel
from service.engine.sampler import MCRequest
from service.packaging import save

NAMES = ["a", "b", "c"]


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("hetero-cal")
    torch.manual_seed(0)
    src = save(
        mlp(0.25, d_in=3, hidden=16, d_out=2),
        torch.randn(4, 3),
        out_dir=root / "repo",
        name="noisy",
        version="1",
        task="regression",
        intended_use="tests only",
        target="y",
        feature_names=NAMES,
        variance="log_variance",
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 3)).round(3)
    y = (x.sum(axis=1) * 0.1 + rng.normal(scale=0.5, size=80)).round(3)
    write_csv(root / "cal.csv", NAMES, x[:50], y[:50])
    write_csv(root / "test.csv", NAMES, x[50:], y[50:])
    calibrate_bundle(src, root / "cal.csv", root / "repo", samples=100, seed=2)
    return src, root / "cal.csv", root / "test.csv"


def _mixture(served: ServedModel, x: np.ndarray, t: int, seed: int) -> np.ndarray:
    """Per pass [T, N, 2]: the mean and the variance exp(log-variance head), by hand."""
    raw = served.sampler.run([MCRequest(x, t, seed)])[0].astype(np.float64)
    return np.stack([raw[..., 0], np.exp(raw[..., 1])], axis=-1)


def test_conformal_scores_use_the_mixture_std(calibrated: tuple[Path, Path, Path]) -> None:
    src, cal_csv, _ = calibrated
    source = ServedModel(load_bundle(src), device="cpu")
    data = read(cal_csv, source.manifest)
    m = _mixture(source, data.x, 100, 2)
    mean = m[..., 0].mean(0)
    std = np.sqrt(m[..., 0].var(0) + m[..., 1].mean(0))
    new = load_bundle(src.parent / "2").manifest
    assert new.calibration is not None and new.referral is not None
    want = np.sort(np.abs(data.y - mean) / std)
    np.testing.assert_allclose(new.calibration.scores, want, rtol=1e-12)
    # A learned noise tells inputs apart, so it gets a referral threshold, set jointly with the
    # others (the triggers together refer 10 % of the calibration rows): it refers some rows,
    # at most that share.
    aleatoric = np.sqrt(m[..., 1].mean(0))
    assert new.referral.aleatoric is not None
    share = float(np.mean(aleatoric > new.referral.aleatoric))
    assert 0.0 < share <= 0.10 + 1.0 / aleatoric.size
    assert "aleatoric" in (new.referral.derived_from or "")


def test_evaluate_scores_the_mixture_density(calibrated: tuple[Path, Path, Path]) -> None:
    src, _, test_csv = calibrated
    served = ServedModel(load_bundle(src.parent / "2"), device="cpu")
    data = read(test_csv, served.manifest)
    ev = evaluate(served, data, samples=100, seed=9)
    m = _mixture(served, data.x, 100, 9)
    ll = [
        math.log(
            sum(NormalDist(m[t, i, 0], math.sqrt(m[t, i, 1])).pdf(data.y[i]) for t in range(100))
            / 100
        )
        for i in range(data.n)
    ]
    assert ev.numbers["mean_log_likelihood"] == pytest.approx(float(np.mean(ll)), rel=1e-9)
    assert ev.numbers["log_likelihood"] == "MC mixture of the passes' learned Gaussians"
    assert ev.numbers["mean_aleatoric_std"] == pytest.approx(
        float(np.mean(np.sqrt(m[..., 1].mean(0))))
    )
    assert "aleatoric" in ev.numbers["referral"]["triggers"]
