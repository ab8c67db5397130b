"""Quality metrics of predictive uncertainty (see reference/mc-dropout.md, "Quality metrics").

Shapes: ``probs`` ``[B, K]`` predictive probabilities, ``y`` ``[B]`` class indices or targets,
``samples`` ``[T, B]`` MC outputs of one regression target, scores and flags ``[B]``.
Everything is float64 numpy; no metric looks at more than its arguments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ECE_BINS = 15
_P_FLOOR = 1e-12  # -log p is capped at 27.6 nats per row, as models/common.py does


def rmse(mean: np.ndarray, y: np.ndarray) -> float:
    d = np.asarray(mean, dtype=np.float64) - np.asarray(y, dtype=np.float64)
    return float(np.sqrt(np.mean(d**2)))


def mixture_log_likelihood(
    samples: np.ndarray, y: np.ndarray, noise_var: float | np.ndarray
) -> np.ndarray:
    """Per row: log (1/T) sum_t N(y; f_t, s_t^2), by logsumexp. [T, B] -> [B].

    ``noise_var`` is one variance for every pass and row (homoscedastic) or s_t^2 [T, B] from a
    learned noise head."""
    f = np.asarray(samples, dtype=np.float64)
    yy = np.asarray(y, dtype=np.float64)
    s2 = np.asarray(noise_var, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_comp = -0.5 * np.log(2 * math.pi * s2) - (yy - f) ** 2 / (2 * s2)
    # A variance that underflowed to 0 is a point mass: density 0 away from its mean (log(0) -
    # d^2/0 was inf - inf = NaN, and one such pass made the report's likelihood null).
    log_comp = np.where((s2 == 0) & (yy != f), -np.inf, log_comp)
    log_comp = np.where((s2 == 0) & (yy == f), np.inf, log_comp)  # its mean hit: log(inf)
    top = log_comp.max(axis=0)
    safe = np.where(np.isfinite(top), top, 0.0)  # every component 0 (or a point hit): no shift
    with np.errstate(divide="ignore"):
        total = safe + np.log(np.exp(log_comp - safe).sum(axis=0))
    return np.asarray(total - math.log(f.shape[0]))


def gaussian_log_likelihood(mean: np.ndarray, std: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per row: log N(y; mean, std^2)."""
    m, s, yy = (np.asarray(a, dtype=np.float64) for a in (mean, std, y))
    return np.asarray(-0.5 * np.log(2 * math.pi * s**2) - (yy - m) ** 2 / (2 * s**2))


def picp(y: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> float:
    """Prediction interval coverage probability: share of rows with lower <= y <= upper."""
    yy = np.asarray(y, dtype=np.float64)
    return float(np.mean((yy >= lower) & (yy <= upper)))


def mean_width(lower: np.ndarray, upper: np.ndarray) -> float:
    """Mean interval width (MPIW); inf when any interval is unbounded."""
    return float(np.mean(np.asarray(upper, dtype=np.float64) - lower))


def accuracy(probs: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.argmax(probs, axis=1) == np.asarray(y).astype(np.int64)))


def nll(probs: np.ndarray, y: np.ndarray) -> float:
    """Mean -log p(true class)."""
    p = np.asarray(probs, dtype=np.float64)
    yi = np.asarray(y).astype(np.int64)
    return float(-np.log(np.clip(p[np.arange(p.shape[0]), yi], _P_FLOOR, None)).mean())


def brier(probs: np.ndarray, y: np.ndarray) -> float:
    """Multi-class Brier score: mean over rows of sum_k (p_k - [y = k])^2."""
    p = np.asarray(probs, dtype=np.float64)
    onehot = np.eye(p.shape[1])[np.asarray(y).astype(np.int64)]
    return float(((p - onehot) ** 2).sum(axis=1).mean())


@dataclass(frozen=True)
class Reliability:
    """Per bin of top-class confidence (equal width over [0, 1]): count, accuracy, confidence."""

    edges: np.ndarray  # [bins + 1]
    count: np.ndarray  # [bins]
    accuracy: np.ndarray  # [bins], NaN for an empty bin
    confidence: np.ndarray  # [bins], NaN for an empty bin

    @property
    def ece(self) -> float:
        """sum_b n_b / n |accuracy_b - confidence_b| over non-empty bins."""
        m = self.count > 0
        n = self.count.sum()
        return float((self.count[m] / n * np.abs(self.accuracy[m] - self.confidence[m])).sum())


def reliability(probs: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> Reliability:
    """Bin b holds confidences in (edge_b, edge_b+1] (the first bin also holds 0)."""
    p = np.asarray(probs, dtype=np.float64)
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == np.asarray(y).astype(np.int64)).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    count = np.bincount(idx, minlength=bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.bincount(idx, weights=correct, minlength=bins) / count
        mean_conf = np.bincount(idx, weights=conf, minlength=bins) / count
    return Reliability(edges, count, acc, mean_conf)


def ece(probs: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error over ``bins`` equal-width bins of top-class confidence."""
    return reliability(probs, y, bins).ece


def ece_if_calibrated(
    probs: np.ndarray, bins: int = ECE_BINS, draws: int = 200, seed: int = 0
) -> dict[str, float]:
    """The ECE a perfectly calibrated model with these probabilities would show on this many
    rows: labels drawn from the probabilities themselves, `draws` times (seeded). ECE is biased
    upwards on a finite sample (each bin's |accuracy - confidence| is at least its noise), so an
    observed ECE is read against this: mean, sd and the 95th percentile."""
    p = np.asarray(probs, dtype=np.float64)
    cum = np.cumsum(p / p.sum(axis=1, keepdims=True), axis=1)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(draws):
        u = rng.random((p.shape[0], 1))
        y = np.minimum((u > cum).sum(axis=1), p.shape[1] - 1)
        values.append(ece(p, y, bins))
    v = np.asarray(values)
    return {
        "mean": float(v.mean()),
        "sd": float(v.std(ddof=1)),
        "p95": float(np.percentile(v, 95)),
        "draws": float(draws),
    }


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for telling positives (True) from negatives.

    The Mann-Whitney statistic with mid-ranks, so ties count one half. NaN when either class is
    empty (e.g. a model that makes no errors has no error-detection AUROC).
    """
    s = np.asarray(scores, dtype=np.float64)
    pos = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(s.size, dtype=np.float64)
    sorted_s = s[order]
    # Mid-ranks: every member of a run of equal scores gets the run's average rank.
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], s.size]
    for a, b in zip(starts, ends, strict=True):
        ranks[order[a:b]] = (a + b + 1) / 2.0
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def bootstrap_auroc(
    scores: np.ndarray, positive: np.ndarray, *, reps: int = 1000, seed: int = 0
) -> tuple[float, float, float]:
    """(AUROC, 2.5 %, 97.5 % percentile-bootstrap bounds), resampling positives and negatives
    separately so every replicate has both classes."""
    s = np.asarray(scores, dtype=np.float64)
    pos = np.asarray(positive, dtype=bool)
    sp, sn = s[pos], s[~pos]
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(reps):
        a = sp[rng.integers(0, sp.size, sp.size)]
        b = sn[rng.integers(0, sn.size, sn.size)]
        draws.append(auroc(np.r_[a, b], np.r_[np.ones(a.size, bool), np.zeros(b.size, bool)]))
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return auroc(s, pos), float(lo), float(hi)


def risk_coverage(uncertainty: np.ndarray, error: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(coverage [B], risk [B]): keep the k least uncertain rows, k = 1..B; risk = their error
    rate. Rows of equal uncertainty cannot be told apart, so within a tie each counts its
    group's mean error: the curve expected over every order of the tie. (Row order broke ties
    before: a constant score with 20 % errors gave AURC 0.02 or 0.52 by where the errors sat,
    and the variation ratio, 60 values over 575 texts, 0.314 to 0.364 over row orders.)"""
    u = np.asarray(uncertainty, dtype=np.float64)
    order = np.argsort(u, kind="mergesort")
    _, group = np.unique(u[order], return_inverse=True)
    e = np.asarray(error, dtype=np.float64)[order]
    mean = np.bincount(group, weights=e) / np.bincount(group)
    e = mean[group]
    k = np.arange(1, e.size + 1)
    return k / e.size, np.cumsum(e) / k


def aurc(uncertainty: np.ndarray, error: np.ndarray) -> float:
    """Area under the risk-coverage curve: the mean of the risks at coverage 1/B .. B/B (lower is
    better; a perfect ranking gives about the error rate squared / 2)."""
    return float(risk_coverage(uncertainty, error)[1].mean())


def set_coverage(members: np.ndarray, y: np.ndarray) -> float:
    """Share of rows whose prediction set ([B, K] bool) holds the true class."""
    m = np.asarray(members, dtype=bool)
    return float(m[np.arange(m.shape[0]), np.asarray(y).astype(np.int64)].mean())


def mean_set_size(members: np.ndarray) -> float:
    return float(np.asarray(members, dtype=bool).sum(axis=1).mean())


def macro_f1(pred: np.ndarray, y: np.ndarray, k: int) -> float:
    """Unweighted mean over the k classes of F1 = 2 tp / (2 tp + fp + fn) (0 where a class is
    neither predicted nor present; scikit-learn's macro `f1_score` over labels 0..k-1)."""
    p, t = np.asarray(pred).astype(np.int64), np.asarray(y).astype(np.int64)
    scores = []
    for c in range(k):
        tp = float(np.sum((p == c) & (t == c)))
        wrong = float(np.sum((p == c) & (t != c)) + np.sum((p != c) & (t == c)))
        scores.append(2 * tp / (2 * tp + wrong) if tp + wrong > 0 else 0.0)
    return float(np.mean(scores))


def lenient_targets(pred: np.ndarray, y: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Per row, the prediction when it is any label of the row's text (rows with the same group
    hold the same text), else the row's own label: a multi-label text's row counts as right
    when the prediction is one of the text's labels."""
    p, t, g = (np.asarray(a).astype(np.int64) for a in (pred, y, groups))
    labels_of: dict[int, set[int]] = {}
    for gi, ti in zip(g.tolist(), t.tolist(), strict=True):
        labels_of.setdefault(gi, set()).add(ti)
    ok = np.array([pi in labels_of[gi] for pi, gi in zip(p.tolist(), g.tolist(), strict=True)])
    return np.where(ok, p, t)
