"""Temperature scaling of MC dropout logits (Guo et al. 2017), fitted on calibration data.

``logits`` are samples-first ``[T, B, K]``; each pass is divided by the temperature before its
softmax and the passes are averaged, exactly as the served summary does. The fitted temperature
minimises the negative log-likelihood of the averaged probabilities: one number, so a bounded
1-D search (log-spaced grid, then golden section) is exact enough and needs no scipy.
"""

from __future__ import annotations

import math

import numpy as np

from service.engine.summaries import softmax

BOUNDS = (0.05, 20.0)
_GRID = 97  # log-spaced, about 6.4 % apart
_ITERATIONS = 40
_P_FLOOR = 1e-300  # log(0) guard for a class with underflowed probability


def mc_probabilities(logits: np.ndarray, temperature: float) -> np.ndarray:
    """[B, K] mean over passes of softmax(logits_t / temperature)."""
    z = np.asarray(logits, dtype=np.float64)
    return softmax(z / temperature, axis=-1).mean(axis=0)


def row_nll(logits: np.ndarray, y: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Per row -log p_y of the MC-averaged probabilities at ``temperature``: [B]."""
    p = mc_probabilities(logits, temperature)
    yi = np.asarray(y).astype(np.int64)
    return np.asarray(-np.log(np.maximum(p[np.arange(p.shape[0]), yi], _P_FLOOR)))


def nll(logits: np.ndarray, y: np.ndarray, temperature: float = 1.0) -> float:
    """Mean -log p_y of the MC-averaged probabilities at ``temperature``."""
    return float(row_nll(logits, y, temperature).mean())


def fit(
    logits: np.ndarray, y: np.ndarray, bounds: tuple[float, float] = BOUNDS, one_se: bool = True
) -> float:
    """The temperature in ``bounds`` that minimises the calibration NLL (one-SE rule optional).

    The NLL of a mixture of softmaxes need not be convex in T, so a log-spaced grid picks the
    basin first and golden section refines it. With ``one_se`` (the one-standard-error rule of
    Breiman et al. 1984), the temperature nearest 1 whose NLL is not worse than the minimum's by
    more than one standard error of the per-row difference is taken instead: the data cannot
    tell those apart, and a nearly perfect model (few or no errors on the calibration rows)
    otherwise drifts towards T -> 0, where the NLL keeps falling by ever smaller amounts.
    """
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 3:
        raise ValueError(f"logits must be [T, B, K], got shape {z.shape}")
    if z.shape[1] < 2:  # one row pins no temperature (it gave 0.053: every input referred)
        return 1.0
    grid = np.linspace(math.log(bounds[0]), math.log(bounds[1]), _GRID)
    rows = np.stack([row_nll(z, y, math.exp(g)) for g in grid])  # [G, B]
    best = int(np.argmin(rows.mean(axis=1)))
    x = _golden(z, y, grid[max(best - 1, 0)], grid[min(best + 1, _GRID - 1)])
    base = row_nll(z, y, math.exp(x))
    if base.mean() > rows[best].mean():  # a flat or noisy basin: keep the grid point
        x, base = grid[best], rows[best]
    if not one_se or base.size < 2:
        return math.exp(x)
    d = rows - base
    ok = np.flatnonzero(d.mean(axis=1) <= d.std(axis=1, ddof=1) / math.sqrt(base.size))
    nearest = int(ok[np.argmin(np.abs(grid[ok]))]) if ok.size else best
    return math.exp(grid[nearest] if abs(grid[nearest]) < abs(x) else x)


def _golden(z: np.ndarray, y: np.ndarray, a: float, b: float) -> float:
    """Minimise the NLL over log T in [a, b] by golden-section search; returns log T."""
    inv_phi = (math.sqrt(5.0) - 1.0) / 2.0
    c, d = b - inv_phi * (b - a), a + inv_phi * (b - a)
    fc, fd = nll(z, y, math.exp(c)), nll(z, y, math.exp(d))
    for _ in range(_ITERATIONS):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - inv_phi * (b - a)
            fc = nll(z, y, math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + inv_phi * (b - a)
            fd = nll(z, y, math.exp(d))
    return (a + b) / 2.0
