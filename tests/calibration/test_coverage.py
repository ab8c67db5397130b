"""Split-conformal coverage meets its finite-sample guarantee over many random splits.

The bound. With n exchangeable calibration scores (continuous, so no ties) and the threshold
q = the k-th smallest, k = ceil((n + 1)(1 - alpha)), the coverage of a fresh point *given the
calibration set* is C ~ Beta(k, n + 1 - k) (Vovk 2012; Angelopoulos & Bates 2021, sec. 3.2),
so E[C] = k / (n + 1), which lies in [1 - alpha, 1 - alpha + 1 / (n + 1)). Counting hits over
m test points of one split gives Binomial(m, C); the mean of the per-split coverages over R
independent splits therefore has expectation k / (n + 1) and variance
    (Var[C] + E[C(1 - C)] / m) / R,   Var[C] = k (n + 1 - k) / ((n + 1)^2 (n + 2)),
    E[C(1 - C)] = E[C] - Var[C] - E[C]^2.
The tests accept |observed - k / (n + 1)| <= 4 standard deviations (two-sided p ~ 6e-5 under
the guarantee) and also check observed >= 1 - alpha - 4 sd, the guarantee itself. Fixed seeds.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from service.engine import conformal
from service.engine.summaries import softmax

R, N, M = 400, 50, 200  # splits, calibration points per split, test points per split


def expected_and_sd(n: int, m: int, r: int, level: float) -> tuple[float, float]:
    k = conformal.rank(n, level)
    mean = k / (n + 1)
    var_c = k * (n + 1 - k) / ((n + 1) ** 2 * (n + 2))
    e_c1c = mean - var_c - mean**2
    return mean, math.sqrt((var_c + e_c1c / m) / r)


def check(covered: np.ndarray, level: float) -> None:
    """``covered`` [R, M] bool: hits of each split's test points."""
    per_split = covered.mean(axis=1)
    observed = float(per_split.mean())
    mean, sd = expected_and_sd(N, M, R, level)
    assert abs(observed - mean) <= 4 * sd, (observed, mean, sd)
    assert observed >= level - 4 * sd


@pytest.mark.parametrize("level", [0.5, 0.8, 0.9, 0.95])
def test_regression_intervals_cover(level: float) -> None:
    rng = np.random.default_rng(int(level * 1000))
    x = rng.uniform(-2, 2, size=(R, N + M))
    true_std = 0.2 + np.abs(x)  # heteroscedastic noise
    y = np.sin(x) + true_std * rng.standard_normal(x.shape)
    # A misspecified model: biased mean, std too small by half (gaussian intervals under-cover).
    mean, std = np.sin(x) + 0.1, 0.5 * true_std
    covered = np.zeros((R, M), dtype=bool)
    for r in range(R):
        s = np.sort(conformal.regression_scores(y[r, :N], mean[r, :N], std[r, :N]))
        lo, hi = conformal.interval(mean[r, N:], std[r, N:], conformal.quantile(s, level))
        covered[r] = (y[r, N:] >= lo) & (y[r, N:] <= hi)
    check(covered, level)
    gaussian = np.abs(y[:, N:] - mean[:, N:]) <= 1.6449 * std[:, N:]
    assert gaussian.mean() < 0.8  # the raw intervals of this model under-cover (nominal 0.9)


@pytest.mark.parametrize("level", [0.8, 0.9, 0.95])
def test_classification_sets_cover(level: float) -> None:
    rng = np.random.default_rng(int(level * 1000) + 1)
    k = 4
    logits = rng.normal(scale=2.0, size=(R, N + M, k))
    # Labels drawn from a flatter distribution than the model claims (over-confident model).
    true_p = softmax(logits / 2.5)
    u = rng.random((R, N + M, 1))
    y = (u > np.cumsum(true_p, axis=-1)).sum(axis=-1)
    model_p = softmax(logits)
    covered = np.zeros((R, M), dtype=bool)
    for r in range(R):
        s = np.sort(conformal.classification_scores(model_p[r, :N], y[r, :N]))
        members = conformal.prediction_set(model_p[r, N:], conformal.quantile(s, level))
        covered[r] = members[np.arange(M), y[r, N:]]
    check(covered, level)


def test_the_bound_is_tight_enough_to_catch_a_wrong_threshold() -> None:
    """The check rejects a threshold one rank below conformal's k (coverage lower by 1 / (n + 1),
    about 8 sd here): without this the tests above could pass with a useless bound."""
    level = 0.9
    rng = np.random.default_rng(7)
    scores = np.abs(rng.standard_normal((R, N + M)))
    cal = np.sort(scores[:, :N], axis=1)
    k = conformal.rank(N, level)
    with pytest.raises(AssertionError):
        check(scores[:, N:] <= cal[:, k - 2][:, None], level)
    check(scores[:, N:] <= cal[:, k - 1][:, None], level)
