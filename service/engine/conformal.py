"""Split conformal prediction (Angelopoulos & Bates 2021): scores, thresholds, intervals, sets.

Shapes: regression ``mean``/``std`` are ``[B]`` or ``[B, D]``; classification ``probs`` is
``[B, K]``. Scores are computed on a held-out calibration set and stored sorted; at a level
1 - alpha the threshold is q = the k-th smallest score with k = ceil((n + 1)(1 - alpha)). When
k > n the calibration set is too small for that level and q is infinite (the interval or set
is everything): still valid, just uninformative, and the caller says so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# A total std of 0 (no noise and all passes equal) would make the score infinite.
STD_FLOOR = 1e-12


def rank(n: int, level: float) -> int:
    """k = ceil((n + 1) * level), the 1-based rank of the conformal threshold among n scores."""
    if n < 1:
        raise ValueError("conformal calibration needs at least one score")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level {level!r} is outside (0, 1)")
    # (n + 1) * 0.9 is 80.10000000000001 for n = 88 in binary; rounding keeps ceil at 81. At
    # least 1: a level under 1e-9 / (n + 1) rounded to rank 0, which read the largest score.
    return max(1, math.ceil(round((n + 1) * level, 9)))


def min_n(level: float) -> int:
    """Fewest calibration scores for a finite threshold at ``level``: ceil(level / (1 - level))."""
    # (n + 1) level <= n  <=>  n >= level / (1 - level); check with rank() against rounding.
    n = max(1, math.ceil(round(level / (1.0 - level), 9)) - 1)
    while rank(n, level) > n:
        n += 1
    return n


def quantile(sorted_scores: Sequence[float] | np.ndarray, level: float) -> float:
    """The conformal threshold q at ``level`` from ascending scores (inf if n is too small)."""
    s = np.asarray(sorted_scores, dtype=np.float64)
    k = rank(s.size, level)
    return math.inf if k > s.size else float(s[k - 1])


def regression_scores(y: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Normalised residuals |y - mean| / std, same shape as ``y``."""
    y, mean, std = (np.asarray(a, dtype=np.float64) for a in (y, mean, std))
    return np.abs(y - mean) / np.maximum(std, STD_FLOOR)


def interval(mean: np.ndarray, std: np.ndarray, q: float) -> tuple[np.ndarray, np.ndarray]:
    """mean -+ q * std (q = inf gives -inf / +inf bounds)."""
    mean, std = np.asarray(mean, dtype=np.float64), np.asarray(std, dtype=np.float64)
    if math.isinf(q):
        return np.full_like(mean, -math.inf), np.full_like(mean, math.inf)
    half = q * np.maximum(std, STD_FLOOR)
    return mean - half, mean + half


def classification_scores(probs: np.ndarray, y: np.ndarray) -> np.ndarray:
    """1 - p_y for each row: [B]."""
    p = np.asarray(probs, dtype=np.float64)
    yi = np.asarray(y).astype(np.int64)
    return 1.0 - p[np.arange(p.shape[0]), yi]


def prediction_set(probs: np.ndarray, q: float) -> np.ndarray:
    """[B, K] bool: class k is in the set when 1 - p_k <= q (every class when q is inf)."""
    p = np.asarray(probs, dtype=np.float64)
    return (1.0 - p) <= q


def coverage_spread(n: int, level: float, m: int) -> tuple[float, float]:
    """Expected test coverage of a split-conformal interval/set and its standard deviation,
    over calibration sets of ``n`` and ``m`` test points (continuous scores).

    Given the calibration set the coverage is C ~ Beta(k, n + 1 - k), k = rank(n, level)
    (Vovk 2012); the hits among m test points are Binomial(m, C). So the observed share has
    mean k / (n + 1) and variance Var[C] + E[C (1 - C)] / m. Use it to judge whether a
    report's coverage below the nominal level is more than sampling noise. (nan, nan) when the
    threshold is infinite (coverage 1).
    """
    k = rank(n, level)
    if k > n:
        return math.nan, math.nan
    mean = k / (n + 1)
    var_c = k * (n + 1 - k) / ((n + 1) ** 2 * (n + 2))
    return mean, math.sqrt(var_c + (mean - var_c - mean**2) / m)
