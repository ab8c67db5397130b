"""Temperature scaling of MC logits: fitted on calibration rows, judged on held-out rows."""

from __future__ import annotations

import numpy as np
import pytest

from service.calibration import metrics, temperature
from service.engine.summaries import softmax, summarize_classification


def overconfident(
    seed: int, n: int = 2000, passes: int = 20, k: int = 5
) -> tuple[np.ndarray, np.ndarray]:
    """MC logits [T, n, K] that are 3x too sharp: labels come from softmax(z), the model says
    softmax(3 z + pass noise)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(scale=1.5, size=(n, k))
    p = softmax(z)
    y = (rng.random((n, 1)) > np.cumsum(p, axis=1)).sum(axis=1)
    logits = 3.0 * z[None] + rng.normal(scale=0.3, size=(passes, n, k))
    return logits, y


@pytest.mark.parametrize("one_se", [True, False])
def test_lowers_held_out_nll_of_an_overconfident_model(one_se: bool) -> None:
    logits, y = overconfident(0)
    cal, test = slice(0, 1000), slice(1000, 2000)
    t = temperature.fit(logits[:, cal], y[cal], one_se=one_se)
    assert 2.0 < t < 4.0  # about the factor of 3 that made it over-confident
    before = temperature.nll(logits[:, test], y[test], 1.0)
    after = temperature.nll(logits[:, test], y[test], t)
    assert after < before - 0.1, (before, after)
    p1, pt = (temperature.mc_probabilities(logits[:, test], v) for v in (1.0, t))
    assert metrics.ece(pt, y[test]) < metrics.ece(p1, y[test]) / 2


def test_matches_the_served_summary() -> None:
    """The fitted temperature means the same thing as summarize_classification(temperature=)."""
    logits, y = overconfident(1, n=50)
    s = summarize_classification(logits, levels=(0.5,), temperature=2.5)
    assert np.allclose(s.probabilities, temperature.mc_probabilities(logits, 2.5))
    assert s.temperature == 2.5
    assert temperature.nll(logits, y, 2.5) == pytest.approx(metrics.nll(s.probabilities, y))


def test_minimum_is_a_minimum_and_one_se_stays_near_one_without_evidence() -> None:
    logits, y = overconfident(2, n=400)
    t = temperature.fit(logits, y, one_se=False)
    f = temperature.nll(logits, y, t)
    assert f <= temperature.nll(logits, y, t * 1.05) and f <= temperature.nll(logits, y, t / 1.05)
    # A well calibrated model: labels drawn from its own (T = 1) probabilities. The one-SE rule
    # keeps T = 1 unless the data show a real improvement; the plain minimiser wanders.
    rng = np.random.default_rng(3)
    z = rng.normal(scale=2.0, size=(1, 300, 4)).repeat(5, axis=0)
    yy = (rng.random((300, 1)) > np.cumsum(softmax(z[0]), axis=1)).sum(axis=1)
    assert temperature.fit(z, yy, one_se=True) == pytest.approx(1.0)
    assert 0.5 < temperature.fit(z, yy, one_se=False) < 2.0


def test_perfect_predictions_stay_inside_the_bounds() -> None:
    z = np.zeros((3, 10, 3))
    z[:, :, 0] = 4.0
    y = np.zeros(10, dtype=np.int64)  # always right: NLL falls all the way to T -> 0
    t = temperature.fit(z, y, one_se=False)
    lowest = temperature.BOUNDS[0]
    assert lowest <= t < lowest * 1.07  # the lower end: one grid step (6.4 %) at most
    with pytest.raises(ValueError, match=r"\[T, B, K\]"):
        temperature.fit(z[0], y)


def test_one_row_pins_no_temperature() -> None:
    """With one calibration row the fit ran to the bound (0.053 on breast-cancer, whose NLL at
    T = 1 was already 0): every input was then referred."""
    z = np.random.default_rng(0).normal(size=(20, 1, 3))
    assert temperature.fit(z, np.array([1])) == 1.0
    assert temperature.fit(z, np.array([1]), one_se=False) == 1.0
