"""Turn Monte Carlo dropout samples into predictive summaries (see reference/mc-dropout.md):
classification here, regression in regression.py, both on the shared checks below.

Shapes are samples-first:

- regression: ``samples`` is ``[T, B, D]`` (T stochastic passes, B inputs, D targets); every
  per-input result is ``[B, D]``.
- classification: ``logits`` is ``[T, B, K]`` for K classes; probabilities and per-class results
  are ``[B, K]``, scalar scores (entropy, mutual information, variation ratio) are ``[B]``.

All arithmetic is float64 (float32 inputs are cast first): variances are differences of similar
numbers and lose too many digits in float32. Entropies are in nats, with 0 * log 0 = 0.

Pure numpy plus ``math``, so the engine can be used and tested without torch or HTTP.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from service.engine import scaling
from service.errors import InvalidInputError

Method = Literal["gaussian", "quantile"]

_MAX_LEVELS = 5
METHODS: tuple[str, ...] = ("gaussian", "quantile")


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
    mc_standard_error: np.ndarray  # [B, D] = the passes' sample std / sqrt(T)
    intervals: tuple[Interval, ...]
    samples: int  # T


@dataclass(frozen=True)
class ClassificationSummary:
    probabilities: np.ndarray  # [B, K] mean of per-pass softmax
    label: np.ndarray  # [B] int64 argmax of probabilities
    probability_std: np.ndarray  # [B, K] population std (ddof=0) of p_t over passes
    probability_se: np.ndarray  # [B, K] = the passes' sample std (ddof=1) / sqrt(T)
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
        # The intervals' end points are quantiles at 0.5 + v / 2, which rounds to 1.0 (an
        # infinite end) for the last doubles below 1: refused here, before any compute.
        if 0.5 + v / 2.0 >= 1.0:
            raise SummaryError(
                f"confidence level {v!r} is too close to 1 for finite interval ends; use at "
                "most 0.999999"
            )
    return values


def level_text(level: float) -> str:
    """A confidence level for a message: as many digits as it needs (0.9999999 read "1" with
    :g, so a message named another level than the client's)."""
    return f"{level:.12g}"


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
    return np.asarray(0.0 - np.sum(p * log_p, axis=axis))  # 0 - x: never -0.0 (a certain p)


def standard_error(population_std: np.ndarray, t: int) -> np.ndarray:
    """The Monte Carlo standard error of a mean over t passes, from the passes' population std
    (ddof=0): the sample std (ddof=1) over sqrt(t), i.e. population_std / sqrt(t - 1). With
    ddof=0 it was too small by sqrt(t / (t - 1)): intervals from it covered 0.60 at t = 2."""
    return np.asarray(population_std / math.sqrt(t - 1))


def over_passes(x: np.ndarray) -> np.ndarray:
    """Move the passes axis last, contiguous: every reduction over passes then runs the same
    pairwise summation whatever the batch size, so an input's summary is bit-identical alone
    or summarised together with other requests' inputs (numpy sums a contiguous axis pairwise
    but a strided one sequentially)."""
    return np.ascontiguousarray(np.moveaxis(x, 0, -1))


def quantiles(x_last: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """The alpha/2 and 1 - alpha/2 quantiles over the passes of ``over_passes`` output.

    The same numbers as np.quantile over axis 0 of [T, ...] (order statistics do not depend on
    the layout), but numpy partitions along its first axis, which for [T, ...] strides across
    the whole array: a third of a 10-class summary's time; passes-last it reads each input's
    passes contiguously."""
    lo, hi = np.quantile(x_last, [alpha / 2.0, 1.0 - alpha / 2.0], axis=-1, method="linear")
    return lo, hi


def as_samples(values: np.ndarray, name: str) -> np.ndarray:
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


def check_quantile_samples(levels: tuple[float, ...], t: int, what: str, fix: str) -> None:
    for level in levels:
        need = min_samples_for_quantile(level)
        if t < need:
            raise SummaryError(
                f"{what} at {level:g} need samples >= {need} (got {t}); ask for more samples {fix}"
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
    z = as_samples(logits, "logits")
    levels_ = check_levels(levels) if len(levels) else ()
    t, _, k = z.shape
    if k < 2:
        raise SummaryError(f"classification needs at least 2 classes (got {k} logits per pass)")
    try:
        temp, scale, bias = scaling.check(k, temperature, class_scale, class_bias)
    except scaling.ScalingError as exc:
        raise SummaryError(exc.message) from exc
    check_quantile_samples(levels_, t, "per-class intervals", "or a lower confidence")

    p_t = softmax(scaling.calibrated_logits(z, temp, scale, bias), axis=-1)  # [T, B, K]
    p_last = over_passes(p_t)  # [B, K, T]
    p = p_last.mean(axis=-1)
    probability_std = p_last.std(axis=-1)  # ddof=0, as E[p^2] - E[p]^2
    predictive_entropy = entropy(p, axis=-1)
    expected_entropy = over_passes(entropy(p_t, axis=-1)).mean(axis=-1)
    # H[mean] >= mean H by concavity; rounding can still leave a -1e-17.
    mutual_information = np.clip(predictive_entropy - expected_entropy, 0.0, None)

    votes = np.argmax(p_t, axis=-1)  # [T, B] each pass's label
    counts = (votes[..., None] == np.arange(k)).sum(axis=0)  # [B, K]
    variation_ratio = 1.0 - counts.max(axis=-1) / t

    intervals: list[Interval] = []
    for level in levels_:
        alpha = 1.0 - level
        lo, hi = quantiles(p_last, alpha)
        intervals.append(Interval(level, "quantile", np.clip(lo, 0.0, 1.0), np.clip(hi, 0.0, 1.0)))

    return ClassificationSummary(
        probabilities=p,
        label=np.argmax(p, axis=-1).astype(np.int64),
        probability_std=probability_std,
        probability_se=standard_error(probability_std, t),
        predictive_entropy=predictive_entropy,
        expected_entropy=expected_entropy,
        mutual_information=mutual_information,
        variation_ratio=variation_ratio,
        intervals=tuple(intervals),
        samples=t,
        temperature=temp,
    )
