"""A regressor's predictive summary from its MC samples [T, B, D]: mean, epistemic, aleatoric and
total std, intervals (Gaussian, or quantiles of the passes' mixture of Gaussians with a noise
head); float64 throughout, as summaries.py."""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

import numpy as np

from service.engine.summaries import (
    METHODS,
    Interval,
    Method,
    RegressionSummary,
    SummaryError,
    as_samples,
    check_levels,
    check_quantile_samples,
    over_passes,
    quantiles,
    standard_error,
)

# Quantile intervals of a noisy regressor sample its predictive mixture this many times (at
# least): the MC error of a 95 % end point is then about 0.4 % of the std, not 2 % (T = 100).
MIXTURE_DRAWS = 4000


def noise_variance(noise_var: float | np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Return the noise variance as float64, scalar (homoscedastic) or ``shape`` (per pass)."""
    s2 = np.asarray(noise_var, dtype=np.float64)
    if s2.ndim != 0 and s2.shape != shape:
        raise SummaryError(
            f"noise_var must be a number or an array shaped like the samples {shape}, "
            f"got shape {tuple(s2.shape)}"
        )
    # `~(s2 >= 0)` catches NaN as well as negatives.
    if np.any(~(s2 >= 0)) or not np.all(np.isfinite(s2)):
        raise SummaryError("noise_var must be finite and >= 0 (a variance); check the noise head")
    return s2


def mixture_draws_per_pass(t: int) -> int:
    """Draws from each pass's Gaussian for quantile intervals: at least MIXTURE_DRAWS in all."""
    return max(1, math.ceil(MIXTURE_DRAWS / t))


def _mixture_draws(f_last: np.ndarray, s2: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Samples of the mixture of N(f_t, s2_t): [B, D, T] means -> [B, D, T * M] draws.

    M = `mixture_draws_per_pass(T)` draws per pass, so a 95 % end point of T = 100 passes comes
    from 4,000 draws, not 100. The normal draws are laid out input-major ([B, D, T, M] in C
    order), so an input's draws do not depend on the inputs after it."""
    b, d, t = f_last.shape
    m = mixture_draws_per_pass(t)
    sd = np.sqrt(s2) if s2.ndim == 0 else over_passes(np.sqrt(s2))
    eps = rng.standard_normal((b, d, t, m))
    sd_ = sd if sd.ndim == 0 else sd[..., None]
    return (f_last[..., None] + sd_ * eps).reshape(b, d, t * m)


def summarize_regression(
    samples: np.ndarray,
    *,
    levels: Sequence[float],
    method: Method = "gaussian",
    noise_var: float | np.ndarray | None = None,
    rng: np.random.Generator | None = None,
) -> RegressionSummary:
    """Mean, epistemic/aleatoric/total std, MC error and intervals from ``samples`` [T, B, D].

    ``noise_var`` is 1/tau (a number) or per-pass variances s_t^2 [T, B, D] from a heteroscedastic
    head (service/engine/heads.py). The predictive distribution is then the mixture of the T
    Gaussians N(f_t, s_t^2): mean = mean of the f_t, aleatoric = sqrt(mean of the s_t^2),
    epistemic = std of the f_t, std = sqrt(epistemic^2 + aleatoric^2) (the mixture's own std).
    Gaussian intervals are mean -+ z std; quantile intervals are quantiles of draws from the
    mixture (`_mixture_draws`) with ``rng`` (then required: the same generator state gives the
    same bounds).
    """
    f = as_samples(samples, "samples")
    levels_ = check_levels(levels)
    if method not in METHODS:
        raise SummaryError(f"unknown interval method {method!r}; use one of {', '.join(METHODS)}")
    t = f.shape[0]
    if method == "quantile":
        # Check before any work: the client can fix this by asking for more passes.
        check_quantile_samples(levels_, t, "quantile intervals", "or use interval=gaussian")

    mean = over_passes(f).mean(axis=-1)
    # np.var subtracts the mean first, avoiding the cancellation of E[f^2] - E[f]^2.
    var_e = np.clip(over_passes(f).var(axis=-1), 0.0, None)
    s2 = None if noise_var is None else noise_variance(noise_var, f.shape)
    if s2 is None:
        var_a = np.zeros_like(mean)
    elif s2.ndim == 0:
        var_a = np.full_like(mean, float(s2))
    else:
        var_a = over_passes(s2).mean(axis=-1)
    std = np.sqrt(var_e + var_a)
    epistemic_std = np.sqrt(var_e)

    intervals: list[Interval] = []
    if method == "gaussian":
        for level in levels_:
            z = NormalDist().inv_cdf(0.5 + level / 2.0)
            intervals.append(Interval(level, method, mean - z * std, mean + z * std))
    else:
        y_last = over_passes(f)
        # Without noise the quantiles would be epistemic only; zero noise needs no random draws.
        if s2 is not None and np.any(s2 > 0):
            if rng is None:
                raise SummaryError(
                    "quantile intervals with noise_var need a random generator (rng) to sample "
                    "the noise; pass rng=np.random.default_rng(seed)"
                )
            y_last = _mixture_draws(y_last, s2, rng)
        for level in levels_:
            alpha = 1.0 - level
            lo, hi = quantiles(y_last, alpha)
            intervals.append(Interval(level, method, lo, hi))

    return RegressionSummary(
        mean=mean,
        std=std,
        epistemic_std=epistemic_std,
        aleatoric_std=np.sqrt(var_a),
        mc_standard_error=standard_error(epistemic_std, t),
        intervals=tuple(intervals),
        samples=t,
    )
