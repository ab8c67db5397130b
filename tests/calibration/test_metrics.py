"""Every metric against a small example worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from service.calibration import metrics
from service.engine import conformal

# Four binary cases: (p, true class). Confidences 0.9, 0.85, 0.62, 0.65 fall in the 15 equal-width
# bins 13 (0.8667-0.9333], 12 (0.8-0.8667], 9 (0.6-0.6667] and 9: away from every bin edge.
PROBS = np.array([[0.9, 0.1], [0.15, 0.85], [0.62, 0.38], [0.35, 0.65]])
Y = np.array([0, 0, 0, 1])  # the second case is an error (predicts 1), the others are right


def test_accuracy_nll_brier() -> None:
    assert metrics.accuracy(PROBS, Y) == 0.75
    expected_nll = -(math.log(0.9) + math.log(0.15) + math.log(0.62) + math.log(0.65)) / 4
    assert metrics.nll(PROBS, Y) == pytest.approx(expected_nll, rel=1e-12)
    # (0.1^2 + 0.1^2) + (0.85^2 + 0.85^2) + (0.38^2 + 0.38^2) + (0.35^2 + 0.35^2), over 4
    assert metrics.brier(PROBS, Y) == pytest.approx((0.02 + 1.445 + 0.2888 + 0.245) / 4)


def test_ece_and_reliability() -> None:
    # bin 13: 1 row, acc 1, conf 0.9; bin 12: 1 row, acc 0, conf 0.85;
    # bin 9: 2 rows, acc 1, conf (0.62 + 0.65) / 2 = 0.635.
    expected = 0.25 * 0.1 + 0.25 * 0.85 + 0.5 * (1 - 0.635)
    assert metrics.ece(PROBS, Y) == pytest.approx(expected, abs=1e-12)
    rel = metrics.reliability(PROBS, Y)
    assert rel.count.tolist() == [0] * 9 + [2, 0, 0, 1, 1, 0]
    assert rel.accuracy[9] == 1.0 and rel.confidence[9] == pytest.approx(0.635)
    assert metrics.ece(PROBS, Y, bins=1) == pytest.approx(
        abs(0.75 - (0.9 + 0.85 + 0.62 + 0.65) / 4)
    )


def test_auroc_with_ties() -> None:
    pos = np.array([False, True, False, True])
    assert metrics.auroc(np.array([0.1, 0.4, 0.35, 0.8]), pos) == 1.0
    # pairs (pos, neg): 0.4 > 0.1, 0.4 = 0.4 (half), 0.8 > 0.1, 0.8 > 0.4  ->  3.5 / 4
    assert metrics.auroc(np.array([0.1, 0.4, 0.4, 0.8]), pos) == 0.875
    assert metrics.auroc(np.array([0.9, 0.1, 0.5, 0.2]), pos) == 0.0
    assert math.isnan(metrics.auroc(np.array([0.1, 0.2]), np.array([False, False])))


def test_bootstrap_auroc_brackets_the_estimate() -> None:
    rng = np.random.default_rng(0)
    pos = np.r_[np.ones(50, bool), np.zeros(50, bool)]
    s = np.r_[rng.normal(1.0, 1.0, 50), rng.normal(0.0, 1.0, 50)]
    est, lo, hi = metrics.bootstrap_auroc(s, pos, reps=200, seed=1)
    assert est == metrics.auroc(s, pos) and lo < est < hi


def test_risk_coverage_and_aurc() -> None:
    unc = np.array([0.1, 0.3, 0.2, 0.4])
    err = np.array([0, 1, 0, 1])
    cov, risk = metrics.risk_coverage(unc, err)
    # kept in order of uncertainty: errors 0, 0, 1, 1 -> risks 0, 0, 1/3, 2/4
    assert cov.tolist() == [0.25, 0.5, 0.75, 1.0]
    assert risk.tolist() == pytest.approx([0, 0, 1 / 3, 0.5])
    assert metrics.aurc(unc, err) == pytest.approx((1 / 3 + 0.5) / 4)


def test_picp_width_rmse() -> None:
    y = np.array([1.0, 2.0, 3.0, 4.0])
    lower, upper = np.array([0.0, 2.5, 2.0, 5.0]), np.array([2.0, 3.0, 3.0, 6.0])
    assert metrics.picp(y, lower, upper) == 0.5  # 1 inside, 2 below, 3 on the edge, 4 below
    assert metrics.mean_width(lower, upper) == (2.0 + 0.5 + 1.0 + 1.0) / 4
    assert metrics.mean_width(np.array([-np.inf]), np.array([np.inf])) == math.inf
    assert metrics.rmse(np.array([1.0, 3.0]), np.array([2.0, 1.0])) == math.sqrt((1 + 4) / 2)


def test_log_likelihoods() -> None:
    # two passes at 0 and 2, y = 1, unit noise: both components give N(1; 0, 1)
    ll = metrics.mixture_log_likelihood(np.array([[0.0], [2.0]]), np.array([1.0]), 1.0)
    assert ll[0] == pytest.approx(-0.5 * math.log(2 * math.pi) - 0.5, rel=1e-12)
    g = metrics.gaussian_log_likelihood(np.array([0.0]), np.array([2.0]), np.array([2.0]))
    assert g[0] == pytest.approx(-0.5 * math.log(2 * math.pi * 4) - 0.5, rel=1e-12)


def test_conformal_threshold_by_hand() -> None:
    scores = np.sort([0.5, 0.1, 0.4, 0.3, 0.2])  # n = 5
    assert conformal.quantile(scores, 0.5) == 0.3  # k = ceil(6 * 0.5) = 3
    assert conformal.quantile(scores, 0.8) == 0.5  # k = ceil(4.8) = 5
    assert conformal.quantile(scores, 0.9) == math.inf  # k = ceil(5.4) = 6 > n
    assert conformal.rank(88, 0.9) == 81  # 89 * 0.9 is 80.10000000000001 in binary
    assert conformal.quantile(scores, 1e-12) == 0.1  # rank 0 read the largest score, 0.5
    assert [conformal.min_n(v) for v in (0.5, 0.8, 0.9, 0.95, 0.99)] == [1, 4, 9, 19, 99]
    lo, hi = conformal.interval(np.array([10.0]), np.array([2.0]), 1.5)
    assert (lo[0], hi[0]) == (7.0, 13.0)


def test_sets_and_their_metrics() -> None:
    probs = np.array([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]])
    assert conformal.classification_scores(probs, np.array([0, 1])).tolist() == pytest.approx(
        [0.3, 0.65]
    )
    members = conformal.prediction_set(probs, 0.7)  # keeps p >= 0.3
    assert members.tolist() == [[True, False, False], [True, True, False]]
    assert metrics.set_coverage(members, np.array([1, 1])) == 0.5
    assert metrics.mean_set_size(members) == 1.5


def test_coverage_spread() -> None:
    # One test point: the hit is Bernoulli(k / (n + 1)), so the sd is sqrt(p (1 - p)).
    mean, sd = conformal.coverage_spread(5, 0.5, 1)
    assert mean == 0.5 and sd == pytest.approx(0.5)
    # Many test points: only the Beta spread of the calibration draw remains, k = 81 of n = 88.
    mean, sd = conformal.coverage_spread(88, 0.9, 10**9)
    assert mean == 81 / 89
    assert sd == pytest.approx(math.sqrt(81 * 8 / (89**2 * 90)), rel=1e-6)
    assert all(math.isnan(v) for v in conformal.coverage_spread(88, 0.99, 10))


def test_ece_if_calibrated_is_the_ece_of_labels_drawn_from_the_probabilities() -> None:
    rng = np.random.default_rng(3)
    p = rng.dirichlet(np.ones(4), size=300)
    null = metrics.ece_if_calibrated(p, draws=100, seed=1)
    assert null == metrics.ece_if_calibrated(p, draws=100, seed=1)  # seeded
    # By hand: labels from the probabilities, the same ECE, averaged.
    cum = np.cumsum(p, axis=1)
    g = np.random.default_rng(1)
    by_hand = [
        metrics.ece(p, np.minimum((g.random((300, 1)) > cum).sum(axis=1), 3)) for _ in range(100)
    ]
    assert null["mean"] == pytest.approx(np.mean(by_hand)) and null["sd"] > 0
    # Finite-sample bias: clearly above 0 for a calibrated model; a sharpened copy of the same
    # probabilities (overconfident) lies far above it (bound: 5 sd of the reference).
    assert null["mean"] > 0.02
    sharp = p**3 / (p**3).sum(axis=1, keepdims=True)
    y = np.minimum((g.random((300, 1)) > cum).sum(axis=1), 3)
    assert metrics.ece(sharp, y) > null["mean"] + 5 * null["sd"]


def test_aurc_does_not_depend_on_the_order_of_tied_rows() -> None:
    """Ties were broken by row order: a constant score with 20 % errors gave 0.02 or 0.52 by
    where the errors sat. Now a tie counts its mean error: the average over its orders."""
    from itertools import permutations

    from service.calibration.metrics import aurc

    error = np.r_[np.ones(20), np.zeros(80)]
    assert aurc(np.zeros(100), error) == pytest.approx(0.2)
    assert aurc(np.zeros(100), error[::-1]) == pytest.approx(0.2)
    u = np.array([0.1, 0.1, 0.1, 0.5, 0.5, 0.9])
    e = np.array([1.0, 0.0, 0.0, 1.0, 0.0, 1.0])
    # every order of the two tied groups, by brute force: their mean is the tie-averaged AURC
    orders = {p for p in permutations(range(6)) if sorted(u[list(p)]) == list(u[list(p)])}
    brute = np.mean([aurc(np.arange(6.0), e[list(p)]) for p in orders])
    assert aurc(u, e) == pytest.approx(brute)
    shuffled = np.random.default_rng(0).permutation(6)
    assert aurc(u[shuffled], e[shuffled]) == pytest.approx(aurc(u, e))
