"""Summaries checked against small examples worked out by hand (see reference/mc-dropout.md)."""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest

from service.engine.regression import summarize_regression
from service.engine.summaries import (
    ClassificationSummary,
    Interval,
    RegressionSummary,
    SummaryError,
    check_levels,
    entropy,
    min_samples_for_quantile,
    softmax,
    summarize_classification,
)

# Standard normal quantiles z_{1-alpha/2} from tables: level 0.5 -> z_0.75, 0.9 -> z_0.95,
# 0.95 -> z_0.975.
Z_75 = 0.6744897501960817
Z_95 = 1.6448536269514722
Z_975 = 1.959963984540054


def h2(q: float) -> float:
    """Binary entropy in nats, written out by hand."""
    return -(q * math.log(q) + (1 - q) * math.log(1 - q))


def column(values: list[float]) -> np.ndarray:
    """T passes of one input with one target: shape [T, 1, 1]."""
    return np.array(values, dtype=np.float64).reshape(-1, 1, 1)


# --------------------------------------------------------------------------- regression


def test_regression_hand_example_gaussian() -> None:
    # Target 0 over T=4 passes: 1, 2, 3, 6 -> mean 3; E[f^2] = (1+4+9+36)/4 = 12.5;
    # var_e = 12.5 - 9 = 3.5. Noise 1/tau = 0.5 -> var = 4, std = 2.
    # Target 1 is constant 5 -> var_e = 0, std = sqrt(0.5).
    samples = np.array([[[1.0, 5.0]], [[2.0, 5.0]], [[3.0, 5.0]], [[6.0, 5.0]]])
    s = summarize_regression(samples, levels=[0.5, 0.95], noise_var=0.5)
    assert isinstance(s, RegressionSummary)
    assert s.samples == 4
    assert s.mean.shape == (1, 2)
    np.testing.assert_allclose(s.mean, [[3.0, 5.0]], rtol=0, atol=1e-12)
    np.testing.assert_allclose(s.epistemic_std, [[math.sqrt(3.5), 0.0]], rtol=0, atol=1e-12)
    np.testing.assert_allclose(s.aleatoric_std, [[math.sqrt(0.5)] * 2], rtol=0, atol=1e-12)
    np.testing.assert_allclose(s.std, [[2.0, math.sqrt(0.5)]], rtol=0, atol=1e-12)
    # The mean's standard error from the sample variance (ddof=1): 3.5 * 4/3 over 4 passes.
    np.testing.assert_allclose(s.mc_standard_error, [[math.sqrt(3.5 * 4 / 3 / 4), 0.0]], atol=1e-12)

    assert [(iv.level, iv.method) for iv in s.intervals] == [(0.5, "gaussian"), (0.95, "gaussian")]
    half, full = s.intervals
    np.testing.assert_allclose(half.lower, [[3 - Z_75 * 2, 5 - Z_75 * math.sqrt(0.5)]], atol=1e-12)
    np.testing.assert_allclose(half.upper, [[3 + Z_75 * 2, 5 + Z_75 * math.sqrt(0.5)]], atol=1e-12)
    np.testing.assert_allclose(
        full.lower, [[3 - Z_975 * 2, 5 - Z_975 * math.sqrt(0.5)]], atol=1e-12
    )
    np.testing.assert_allclose(
        full.upper, [[3 + Z_975 * 2, 5 + Z_975 * math.sqrt(0.5)]], atol=1e-12
    )


def test_regression_without_noise_is_epistemic_only() -> None:
    # T=2: 0 and 2 -> mean 1, var_e = (0 + 4)/2 - 1 = 1.
    s = summarize_regression(column([0.0, 2.0]), levels=[0.95])
    assert s.mean[0, 0] == pytest.approx(1.0)
    assert s.std[0, 0] == pytest.approx(1.0)
    assert s.aleatoric_std[0, 0] == 0.0
    assert s.intervals[0].lower[0, 0] == pytest.approx(1 - Z_975)
    assert s.intervals[0].upper[0, 0] == pytest.approx(1 + Z_975)


def test_regression_heteroscedastic_aleatoric_variance() -> None:
    # f = 0, 2 -> var_e = 1; per-pass variances s_t^2 = 1, 3 -> var_a = 2; var = 3.
    s = summarize_regression(column([0.0, 2.0]), levels=[0.9], noise_var=column([1.0, 3.0]))
    assert s.aleatoric_std[0, 0] == pytest.approx(math.sqrt(2.0))
    assert s.epistemic_std[0, 0] == pytest.approx(1.0)
    assert s.std[0, 0] == pytest.approx(math.sqrt(3.0))
    assert s.intervals[0].upper[0, 0] == pytest.approx(1 + Z_95 * math.sqrt(3.0))


def test_regression_quantile_hand_example() -> None:
    # Level 0.5 -> alpha 0.5 -> quantiles 0.25 and 0.75, needs T >= 4. Sorted passes 1, 2, 3, 6:
    # linear positions 0.25*3 = 0.75 -> 1 + 0.75*(2-1) = 1.75;
    #                  0.75*3 = 2.25 -> 3 + 0.25*(6-3) = 3.75.
    s = summarize_regression(column([6.0, 1.0, 3.0, 2.0]), levels=[0.5], method="quantile")
    (iv,) = s.intervals
    assert iv.method == "quantile" and iv.level == 0.5
    assert iv.lower[0, 0] == pytest.approx(1.75)
    assert iv.upper[0, 0] == pytest.approx(3.75)
    # The analytic moments are reported whatever the interval method.
    assert s.mean[0, 0] == pytest.approx(3.0)
    assert s.epistemic_std[0, 0] == pytest.approx(math.sqrt(3.5))


def test_quantile_needs_enough_passes() -> None:
    samples = np.zeros((100, 1, 1))
    with pytest.raises(SummaryError) as err:
        summarize_regression(samples, levels=[0.99], method="quantile")
    assert str(err.value) == (
        "quantile intervals at 0.99 need samples >= 200 (got 100); "
        "ask for more samples or use interval=gaussian"
    )
    # Gaussian intervals have no such limit, and 0.95 needs only 40.
    summarize_regression(samples, levels=[0.99], method="gaussian")
    summarize_regression(samples, levels=[0.95], method="quantile")


@pytest.mark.parametrize(
    ("level", "expected"),
    [(0.5, 4), (0.7, 7), (0.8, 10), (0.9, 20), (0.95, 40), (0.99, 200), (0.999, 2000)],
)
def test_min_samples_for_quantile(level: float, expected: int) -> None:
    # ceil(2 / alpha), e.g. 0.7 -> 2 / 0.3 = 6.67 -> 7; float error must not turn 200 into 201.
    assert min_samples_for_quantile(level) == expected


def test_quantile_noise_sampling_reproducible_and_bounded() -> None:
    # f = 0 for every pass, noise variance 4: y_t = 2 * eps_t ~ N(0, 4), so the 0.9 interval
    # should be close to +-2 * z_0.95. Sampling error of the p-quantile of n draws:
    # sqrt(p (1 - p) / n) / density(quantile); allow 5 of those standard errors.
    t, sigma, p = 4000, 2.0, 0.05
    samples = np.zeros((t, 1, 1))
    a = summarize_regression(
        samples, levels=[0.9], method="quantile", noise_var=4.0, rng=np.random.default_rng(7)
    )
    b = summarize_regression(
        samples, levels=[0.9], method="quantile", noise_var=4.0, rng=np.random.default_rng(7)
    )
    c = summarize_regression(
        samples, levels=[0.9], method="quantile", noise_var=4.0, rng=np.random.default_rng(8)
    )
    np.testing.assert_array_equal(a.intervals[0].lower, b.intervals[0].lower)
    np.testing.assert_array_equal(a.intervals[0].upper, b.intervals[0].upper)
    assert a.intervals[0].lower[0, 0] != c.intervals[0].lower[0, 0]

    q = sigma * Z_95
    density = math.exp(-(Z_95**2) / 2) / (sigma * math.sqrt(2 * math.pi))
    se = math.sqrt(p * (1 - p) / t) / density  # about 0.067
    assert abs(a.intervals[0].lower[0, 0] - (-q)) < 5 * se
    assert abs(a.intervals[0].upper[0, 0] - q) < 5 * se
    # Noise is sampled into the quantiles only; the analytic std is untouched: sqrt(0 + 4) = 2.
    assert a.std[0, 0] == pytest.approx(2.0)
    assert a.epistemic_std[0, 0] == 0.0


def test_quantile_heteroscedastic_noise_is_per_element() -> None:
    # Input 0 has zero noise in every pass, input 1 has variance 1: only input 1 gets spread.
    t = 40
    samples = np.zeros((t, 2, 1))
    s2 = np.zeros((t, 2, 1))
    s2[:, 1, 0] = 1.0
    s = summarize_regression(
        samples, levels=[0.95], method="quantile", noise_var=s2, rng=np.random.default_rng(0)
    )
    np.testing.assert_allclose(s.aleatoric_std[:, 0], [0.0, 1.0])
    iv = s.intervals[0]
    assert iv.lower[0, 0] == 0.0 and iv.upper[0, 0] == 0.0
    assert iv.lower[1, 0] < -0.5 and iv.upper[1, 0] > 0.5


def test_quantile_noise_needs_rng() -> None:
    with pytest.raises(SummaryError, match="rng"):
        summarize_regression(np.zeros((4, 1, 1)), levels=[0.5], method="quantile", noise_var=1.0)
    # Zero noise has nothing to sample, so no generator is needed.
    s = summarize_regression(
        column([6.0, 1.0, 3.0, 2.0]), levels=[0.5], method="quantile", noise_var=0.0
    )
    assert s.intervals[0].lower[0, 0] == pytest.approx(1.75)


@pytest.mark.parametrize(
    ("noise", "match"),
    [(-1.0, ">= 0"), (math.nan, ">= 0"), (math.inf, ">= 0"), (np.ones((3, 1, 1)), "shape")],
)
def test_bad_noise_var(noise: float | np.ndarray, match: str) -> None:
    with pytest.raises(SummaryError, match=match):
        summarize_regression(np.zeros((2, 1, 1)), levels=[0.9], noise_var=noise)


def test_float32_input_is_summarised_in_float64() -> None:
    s = summarize_regression(column([0.0, 2.0]).astype(np.float32), levels=[0.9])
    assert s.mean.dtype == np.float64 and s.std.dtype == np.float64


@pytest.mark.parametrize(
    ("samples", "match"),
    [
        (np.zeros((4, 1)), "3-D"),
        (np.zeros((1, 1, 1)), "at least 2"),
        (column([0.0, math.nan]), "NaN"),
        (column([0.0, math.inf]), "infinite"),
        (np.zeros((2, 1, 1), dtype=bool), "real numbers"),
    ],
)
def test_bad_samples(samples: np.ndarray, match: str) -> None:
    with pytest.raises(SummaryError, match=match):
        summarize_regression(samples, levels=[0.9])
    with pytest.raises(SummaryError, match=match):
        summarize_classification(samples, levels=[0.5])


def test_unknown_method() -> None:
    with pytest.raises(SummaryError, match="gaussian, quantile"):
        summarize_regression(np.zeros((2, 1, 1)), levels=[0.9], method="conformal")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- levels


def test_check_levels_accepts_and_normalises() -> None:
    assert check_levels([0.9, 0.95]) == (0.9, 0.95)
    assert check_levels((np.float64(0.5),)) == (0.5,)
    assert check_levels([0.1] * 5) == (0.1,) * 5


@pytest.mark.parametrize(
    "levels",
    [[], [0.0], [1.0], [95], [-0.1], [math.nan], [0.5] * 6, "0.9", ["high"]],
)
def test_check_levels_rejects(levels: list[float]) -> None:
    with pytest.raises(SummaryError):
        check_levels(levels)


# --------------------------------------------------------------------------- classification


def test_softmax_and_entropy_by_hand() -> None:
    np.testing.assert_allclose(softmax(np.array([math.log(3), 0.0])), [0.75, 0.25])
    # Stable for huge logits: exp(1000) would overflow without subtracting the max.
    np.testing.assert_allclose(softmax(np.array([1000.0, 1000.0])), [0.5, 0.5])
    assert entropy(np.array([1 / 3, 1 / 3, 1 / 3])) == pytest.approx(math.log(3))
    assert entropy(np.array([0.5, 0.5, 0.0])) == pytest.approx(math.log(2))  # 0 * log 0 = 0
    assert entropy(np.array([1.0, 0.0])) == 0.0
    np.testing.assert_allclose(
        entropy(np.array([[0.75, 0.25], [0.5, 0.5]]), axis=-1), [h2(0.75), math.log(2)]
    )


def test_classification_hand_example() -> None:
    # T=4 passes, one input, two classes. Logits [log r, 0] give p = r / (r + 1):
    # r = 3, 3, 1/3, 9 -> p_t(class 0) = 0.75, 0.75, 0.25, 0.9.
    ratios = [3.0, 3.0, 1 / 3, 9.0]
    logits = np.array([[[math.log(r), 0.0]] for r in ratios])
    s = summarize_classification(logits, levels=[0.5])
    assert isinstance(s, ClassificationSummary)
    assert s.samples == 4

    p0 = (0.75 + 0.75 + 0.25 + 0.9) / 4  # 0.6625
    np.testing.assert_allclose(s.probabilities, [[p0, 1 - p0]], atol=1e-12)
    assert s.label.dtype == np.int64 and s.label.tolist() == [0]

    # Deviations from 0.6625: 0.0875, 0.0875, -0.4125, 0.2375 (same size for class 1).
    var = (0.0875**2 + 0.0875**2 + 0.4125**2 + 0.2375**2) / 4  # 0.06046875
    np.testing.assert_allclose(s.probability_std, [[math.sqrt(var)] * 2], atol=1e-12)
    # The standard error from the sample variance (ddof=1): var * 4/3 over 4 passes.
    np.testing.assert_allclose(s.probability_se, [[math.sqrt(var * 4 / 3 / 4)] * 2], atol=1e-12)

    predictive = h2(p0)
    expected = (h2(0.75) + h2(0.75) + h2(0.25) + h2(0.9)) / 4
    assert s.predictive_entropy[0] == pytest.approx(predictive, abs=1e-12)
    assert s.expected_entropy[0] == pytest.approx(expected, abs=1e-12)
    assert s.mutual_information[0] == pytest.approx(predictive - expected, abs=1e-12)
    assert s.mutual_information[0] > 0

    # Per-pass votes 0, 0, 1, 0 -> modal count 3 -> 1 - 3/4.
    assert s.variation_ratio[0] == pytest.approx(0.25)

    # Quantiles 0.25 / 0.75 of the sorted class-0 values 0.25, 0.75, 0.75, 0.9:
    # position 0.75 -> 0.25 + 0.75*0.5 = 0.625; position 2.25 -> 0.75 + 0.25*0.15 = 0.7875.
    # Class 1 is the mirror image: 0.2125 and 0.375.
    (iv,) = s.intervals
    assert isinstance(iv, Interval) and iv.method == "quantile" and iv.level == 0.5
    np.testing.assert_allclose(iv.lower, [[0.625, 0.2125]], atol=1e-12)
    np.testing.assert_allclose(iv.upper, [[0.7875, 0.375]], atol=1e-12)


def test_variation_ratio_three_classes() -> None:
    # T=4 votes 0, 1, 2, 2 -> modal count 2 -> 0.5; a second input votes 1 every time -> 0.
    one_hot = np.eye(3) * 5.0
    logits = np.stack(
        [np.stack([one_hot[a], one_hot[b]]) for a, b in [(0, 1), (1, 1), (2, 1), (2, 1)]]
    )
    s = summarize_classification(logits, levels=[0.5])
    np.testing.assert_allclose(s.variation_ratio, [0.5, 0.0])
    assert s.label.tolist() == [2, 1]


def test_temperature_divides_logits() -> None:
    # Logits [2 log 3, 0]: p = 9/10 at temperature 1; temperature 2 halves them -> p = 3/4.
    logits = np.tile(np.array([[[2 * math.log(3), 0.0]]]), (4, 1, 1))  # T=4: intervals at 0.5
    cold = summarize_classification(logits, levels=[0.5])
    warm = summarize_classification(logits, levels=[0.5], temperature=2.0)
    np.testing.assert_allclose(cold.probabilities, [[0.9, 0.1]], atol=1e-12)
    np.testing.assert_allclose(warm.probabilities, [[0.75, 0.25]], atol=1e-12)
    assert warm.predictive_entropy[0] == pytest.approx(h2(0.75))


@pytest.mark.parametrize("temperature", [0.0, -1.0, math.nan, math.inf])
def test_bad_temperature(temperature: float) -> None:
    with pytest.raises(SummaryError, match="temperature"):
        summarize_classification(np.zeros((4, 1, 2)), levels=[0.5], temperature=temperature)


def test_mutual_information_zero_when_passes_agree_and_never_negative() -> None:
    same = np.tile(np.array([[[0.3, -1.2, 2.0]], [[1.0, 1.0, 1.0]]]).reshape(1, 2, 3), (7, 1, 1))
    s = summarize_classification(same, levels=[0.5])
    np.testing.assert_allclose(s.mutual_information, 0.0, atol=1e-15)
    np.testing.assert_allclose(s.probability_std, 0.0, atol=1e-15)
    np.testing.assert_allclose(s.variation_ratio, 0.0)
    np.testing.assert_allclose(s.expected_entropy[1], math.log(3), atol=1e-12)

    rng = np.random.default_rng(3)
    r = summarize_classification(rng.normal(scale=3.0, size=(50, 20, 4)), levels=[0.9])
    assert np.all(r.mutual_information >= 0)
    assert np.all(r.predictive_entropy <= math.log(4) + 1e-12)


def test_classification_intervals_need_enough_passes() -> None:
    with pytest.raises(SummaryError) as err:
        summarize_classification(np.zeros((10, 1, 2)), levels=[0.95])
    assert str(err.value) == (
        "per-class intervals at 0.95 need samples >= 40 (got 10); "
        "ask for more samples or a lower confidence"
    )


def test_classification_needs_two_classes() -> None:
    with pytest.raises(SummaryError, match="2 classes"):
        summarize_classification(np.zeros((4, 1, 1)), levels=[0.5])


def test_gaussian_quantiles_match_normal_dist() -> None:
    # Guard the table constants used above.
    assert NormalDist().inv_cdf(0.975) == pytest.approx(Z_975, abs=1e-12)
    assert NormalDist().inv_cdf(0.95) == pytest.approx(Z_95, abs=1e-12)
    assert NormalDist().inv_cdf(0.75) == pytest.approx(Z_75, abs=1e-12)


def test_quantile_intervals_equal_numpys_over_the_passes_axis_bit_for_bit() -> None:
    """The passes-last layout (summaries.quantiles) changes where numpy reads, not a bit."""
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(100, 64, 10))
    clf = summarize_classification(logits, levels=[0.8, 0.95])
    p_t = softmax(logits, axis=-1)
    for iv, level in zip(clf.intervals, (0.8, 0.95), strict=True):
        a = 1.0 - level
        lo, hi = np.quantile(p_t, [a / 2, 1 - a / 2], axis=0, method="linear")
        assert np.array_equal(iv.lower, np.clip(lo, 0.0, 1.0))
        assert np.array_equal(iv.upper, np.clip(hi, 0.0, 1.0))
    f = rng.normal(size=(200, 32, 2))
    reg = summarize_regression(f, levels=[0.9], method="quantile")
    a = 1.0 - 0.9  # the summary's own arithmetic: 0.09999999999999998
    lo, hi = np.quantile(f, [a / 2, 1 - a / 2], axis=0, method="linear")
    assert np.array_equal(reg.intervals[0].lower, lo) and np.array_equal(reg.intervals[0].upper, hi)


def test_the_standard_error_covers_the_mean_at_few_passes() -> None:
    """mc_standard_error used the population std (ddof=0): at T = 2, mean -+ 1.96 se covered
    the true mean 0.60 of the time (a reviewer's), and at T = 5 about 0.80. Seeded: 20,000
    replicates of T passes from N(0, 1); with the sample std, mean -+ t(T-1, 0.975) se covers
    0.95 (exactly, for normal passes), within 4 binomial standard errors (0.006)."""
    rng = np.random.default_rng(17)
    for t, quantile in ((2, 12.706), (5, 2.776)):
        f = rng.standard_normal((t, 20_000, 1))
        s = summarize_regression(f, levels=[0.9])
        covered = np.abs(s.mean) <= quantile * s.mc_standard_error
        assert abs(float(covered.mean()) - 0.95) < 4 * math.sqrt(0.95 * 0.05 / 20_000), t


def test_an_entropy_of_zero_is_positive_zero() -> None:
    """-sum(p log p) of a certain p was -0.0: answers printed "-0.0" entropies."""
    h = entropy(np.array([[1.0, 0.0], [0.5, 0.5]]))
    assert math.copysign(1.0, float(h[0])) == 1.0 and h[0] == 0.0
    s = summarize_classification(np.array([[[50.0, -50.0]], [[60.0, -60.0]]]), levels=[])
    for v in (s.predictive_entropy[0], s.expected_entropy[0], s.mutual_information[0]):
        assert math.copysign(1.0, float(v)) == 1.0, v
