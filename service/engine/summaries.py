"""Turn Monte Carlo dropout samples into predictive summaries (see reference/mc-dropout.md).

Shapes are samples-first:

- regression: ``samples`` is ``[T, B, D]`` (T stochastic passes, B inputs, D targets); every
  per-input result is ``[B, D]``.
- classification: ``logits`` is ``[T, B, K]`` for K classes; probabilities and per-class results
  are ``[B, K]``, scalar scores (entropy, mutual information, variation ratio) are ``[B]``.

All arithmetic is float64 (float32 inputs are cast first): variances are differences of similar
numbers and lose too many digits in float32. Entropies are in nats, with 0 * log 0 = 0.

Pure numpy plus ``math``/``statistics``, so the engine can be used and tested without torch or HTTP.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Literal

import numpy as np

from service.engine import scaling
from service.errors import InvalidInputError

Method = Literal["gaussian", "quantile"]

_MAX_LEVELS = 5
# Quantile intervals of a noisy regressor sample its predictive mixture this many times (at
# least): the MC error of a 95 % end point is then about 0.4 % of the std, not 2 % (T = 100).
MIXTURE_DRAWS = 4000
_METHODS: tuple[str, ...] = ("gaussian", "quantile")


class SummaryError(InvalidInputError, ValueError):
    """Bad summary request; message says what and how to fix."""


@dataclass(frozen=True)
class Interval:
    level: float  # nominal coverage, e.g. 0.95
    method: str  # "gaussian" | "quantile" | "conformal"
    lower: np.ndarray  # regression [B, D]; classification per class [B, K]
    upper: np.ndarray


@dataclass(frozen=True)
class PredictionSet:
    """Split-conformal prediction set at one level (calibrated classifiers only)."""

    level: float  # nominal coverage of the true label, e.g. 0.95
    threshold: float  # q: label k is in the set when 1 - p_k <= q (inf: every label)
    members: np.ndarray  # [B, K] bool


@dataclass(frozen=True)
class RegressionSummary:
    mean: np.ndarray  # [B, D]
    std: np.ndarray  # [B, D] total predictive std = sqrt(var_e + var_a)
    epistemic_std: np.ndarray  # [B, D]
    aleatoric_std: np.ndarray  # [B, D]
    mc_standard_error: np.ndarray  # [B, D] = epistemic_std / sqrt(T)
    intervals: tuple[Interval, ...]
    samples: int  # T


@dataclass(frozen=True)
class ClassificationSummary:
    probabilities: np.ndarray  # [B, K] mean of per-pass softmax
    label: np.ndarray  # [B] int64 argmax of probabilities
    probability_std: np.ndarray  # [B, K] population std (ddof=0) of p_t over passes
    probability_se: np.ndarray  # [B, K] = probability_std / sqrt(T)
    predictive_entropy: np.ndarray  # [B] total uncertainty
    expected_entropy: np.ndarray  # [B] aleatoric part
    mutual_information: np.ndarray  # [B] epistemic part (BALD), >= 0
    variation_ratio: np.ndarray  # [B] 1 - modal per-pass vote count / T
    intervals: tuple[Interval, ...]  # per-class quantiles of p_t in [0, 1], method "quantile"
    samples: int  # T
    temperature: float = 1.0  # logits were divided by it before each pass's softmax
    prediction_sets: tuple[PredictionSet, ...] = ()  # one per level, when calibrated


def check_levels(levels: Sequence[float]) -> tuple[float, ...]:
    """Validate confidence levels: 1 to 5 of them, each strictly between 0 and 1."""
    # A str is a Sequence too; "0.9" would otherwise be read character by character.
    if isinstance(levels, str | bytes):
        raise SummaryError(
            f"confidence levels must be a list of numbers, got the string {levels!r}"
        )
    try:
        values = tuple(float(v) for v in levels)
    except (TypeError, ValueError) as exc:
        raise SummaryError(f"confidence levels must be numbers, got {levels!r}") from exc
    if not 1 <= len(values) <= _MAX_LEVELS:
        raise SummaryError(
            f"give between 1 and {_MAX_LEVELS} confidence levels (got {len(values)})"
        )
    for v in values:
        # `not (0 < v < 1)` also rejects NaN.
        if not 0.0 < v < 1.0:
            raise SummaryError(
                f"confidence level {v!r} is outside (0, 1); use e.g. 0.9 or 0.95, not 90 or 1"
            )
    return values


def min_samples_for_quantile(level: float) -> int:
    """Fewest passes T for empirical quantile intervals at ``level``: ceil(2 / alpha)."""
    (level,) = check_levels([level])
    # 1 - 0.99 is 0.010000000000000009 in binary; rounding keeps 0.99 at 200 rather than 201.
    # A level within 1e-12 of 1 would round alpha to 0; keep the raw value then.
    alpha = round(1.0 - level, 12) or 1.0 - level
    return math.ceil(round(2.0 / alpha, 9))


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax in float64 (the max is subtracted so exp cannot overflow)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - np.max(z, axis=axis, keepdims=True)
    e = np.exp(z)
    return e / np.sum(e, axis=axis, keepdims=True)


def entropy(p: np.ndarray, axis: int = -1) -> np.ndarray:
    """Shannon entropy in nats of probability vectors along ``axis``, with 0 * log 0 = 0."""
    p = np.asarray(p, dtype=np.float64)
    # log is only evaluated where p > 0, so no warning and no 0 * -inf = NaN.
    log_p = np.log(p, out=np.zeros_like(p), where=p > 0)
    return np.asarray(-np.sum(p * log_p, axis=axis))


def _over_passes(x: np.ndarray) -> np.ndarray:
    """Move the passes axis last, contiguous: every reduction over passes then runs the same
    pairwise summation whatever the batch size, so an input's summary is bit-identical alone
    or summarised together with other requests' inputs (numpy sums a contiguous axis pairwise
    but a strided one sequentially)."""
    return np.ascontiguousarray(np.moveaxis(x, 0, -1))


def _quantiles(x_last: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """The alpha/2 and 1 - alpha/2 quantiles over the passes of ``_over_passes`` output.

    The same numbers as np.quantile over axis 0 of [T, ...] (order statistics do not depend on
    the layout), but numpy partitions along its first axis, which for [T, ...] strides across
    the whole array: a third of a 10-class summary's time; passes-last it reads each input's
    passes contiguously."""
    lo, hi = np.quantile(x_last, [alpha / 2.0, 1.0 - alpha / 2.0], axis=-1, method="linear")
    return lo, hi


def _as_samples(values: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 3:
        raise SummaryError(
            f"{name} must be 3-D [passes, inputs, outputs], got shape {tuple(arr.shape)}"
        )
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise SummaryError(f"{name} must be real numbers, got dtype {arr.dtype}")
    if arr.shape[0] < 2:
        raise SummaryError(
            f"uncertainty needs at least 2 Monte Carlo passes (got {arr.shape[0]}); "
            "ask for samples >= 2"
        )
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise SummaryError(f"{name} contain NaN or infinite values; the model output is unusable")
    return arr


def _check_quantile_samples(levels: tuple[float, ...], t: int, what: str, fix: str) -> None:
    for level in levels:
        need = min_samples_for_quantile(level)
        if t < need:
            raise SummaryError(
                f"{what} at {level:g} need samples >= {need} (got {t}); ask for more samples {fix}"
            )


def _noise_variance(noise_var: float | np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
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
    sd = np.sqrt(s2) if s2.ndim == 0 else _over_passes(np.sqrt(s2))
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
    f = _as_samples(samples, "samples")
    levels_ = check_levels(levels)
    if method not in _METHODS:
        raise SummaryError(f"unknown interval method {method!r}; use one of {', '.join(_METHODS)}")
    t = f.shape[0]
    if method == "quantile":
        # Check before any work: the client can fix this by asking for more passes.
        _check_quantile_samples(levels_, t, "quantile intervals", "or use interval=gaussian")

    mean = _over_passes(f).mean(axis=-1)
    # np.var subtracts the mean first, avoiding the cancellation of E[f^2] - E[f]^2.
    var_e = np.clip(_over_passes(f).var(axis=-1), 0.0, None)
    s2 = None if noise_var is None else _noise_variance(noise_var, f.shape)
    if s2 is None:
        var_a = np.zeros_like(mean)
    elif s2.ndim == 0:
        var_a = np.full_like(mean, float(s2))
    else:
        var_a = _over_passes(s2).mean(axis=-1)
    std = np.sqrt(var_e + var_a)
    epistemic_std = np.sqrt(var_e)

    intervals: list[Interval] = []
    if method == "gaussian":
        for level in levels_:
            z = NormalDist().inv_cdf(0.5 + level / 2.0)
            intervals.append(Interval(level, method, mean - z * std, mean + z * std))
    else:
        y_last = _over_passes(f)
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
            lo, hi = _quantiles(y_last, alpha)
            intervals.append(Interval(level, method, lo, hi))

    return RegressionSummary(
        mean=mean,
        std=std,
        epistemic_std=epistemic_std,
        aleatoric_std=np.sqrt(var_a),
        mc_standard_error=epistemic_std / math.sqrt(t),
        intervals=tuple(intervals),
        samples=t,
    )


def summarize_classification(
    logits: np.ndarray,
    *,
    levels: Sequence[float],
    temperature: float = 1.0,
    class_scale: Sequence[float] | np.ndarray | None = None,
    class_bias: Sequence[float] | np.ndarray | None = None,
) -> ClassificationSummary:
    """Probabilities, label, entropy decomposition, vote spread and intervals from [T, B, K].

    Each pass's softmax reads the calibrated logits (z / temperature) * class_scale + class_bias
    (`scaling.calibrated_logits`; scale and bias [K], both or neither). ``levels`` may be empty:
    no per-class intervals (the served model drops the levels that need more passes than were
    run, possibly all of them)."""
    z = _as_samples(logits, "logits")
    levels_ = check_levels(levels) if len(levels) else ()
    t, _, k = z.shape
    if k < 2:
        raise SummaryError(f"classification needs at least 2 classes (got {k} logits per pass)")
    try:
        temp, scale, bias = scaling.check(k, temperature, class_scale, class_bias)
    except scaling.ScalingError as exc:
        raise SummaryError(exc.message) from exc
    _check_quantile_samples(levels_, t, "per-class intervals", "or a lower confidence")

    p_t = softmax(scaling.calibrated_logits(z, temp, scale, bias), axis=-1)  # [T, B, K]
    p_last = _over_passes(p_t)  # [B, K, T]
    p = p_last.mean(axis=-1)
    probability_std = p_last.std(axis=-1)  # ddof=0, as E[p^2] - E[p]^2
    predictive_entropy = entropy(p, axis=-1)
    expected_entropy = _over_passes(entropy(p_t, axis=-1)).mean(axis=-1)
    # H[mean] >= mean H by concavity; rounding can still leave a -1e-17.
    mutual_information = np.clip(predictive_entropy - expected_entropy, 0.0, None)

    votes = np.argmax(p_t, axis=-1)  # [T, B] each pass's label
    counts = (votes[..., None] == np.arange(k)).sum(axis=0)  # [B, K]
    variation_ratio = 1.0 - counts.max(axis=-1) / t

    intervals: list[Interval] = []
    for level in levels_:
        alpha = 1.0 - level
        lo, hi = _quantiles(p_last, alpha)
        intervals.append(Interval(level, "quantile", np.clip(lo, 0.0, 1.0), np.clip(hi, 0.0, 1.0)))

    return ClassificationSummary(
        probabilities=p,
        label=np.argmax(p, axis=-1).astype(np.int64),
        probability_std=probability_std,
        probability_se=probability_std / math.sqrt(t),
        predictive_entropy=predictive_entropy,
        expected_entropy=expected_entropy,
        mutual_information=mutual_information,
        variation_ratio=variation_ratio,
        intervals=tuple(intervals),
        samples=t,
        temperature=temp,
    )
