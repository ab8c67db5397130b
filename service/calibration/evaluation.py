"""`service evaluate`: score a bundle's served predictions on labelled rows.

The rows go through the engine exactly as a request would (one MC run, the bundle's own
temperature, conformal thresholds and referral policy), then through `metrics`. The result is a
JSON-ready dict of numbers plus the curves the report plots. Infinite values (an unbounded
conformal interval) are kept as ``math.inf`` here; the report writes them as null.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np

from service.calibration import metrics
from service.calibration.labelled import Labelled, overlaps
from service.engine import conformal, heads
from service.engine.model import ServedModel
from service.engine.params import IntervalMethod, PredictParams
from service.engine.referral import Referral
from service.engine.sampler import MCRequest
from service.engine.summaries import (
    ClassificationSummary,
    RegressionSummary,
    summarize_classification,
)
from service.errors import InvalidInputError

LEVELS = (0.5, 0.8, 0.9, 0.95, 0.99)
CURVE_LEVELS = (*(round(v, 2) for v in np.arange(0.05, 0.951, 0.05)), 0.99)


@dataclass
class Evaluation:
    numbers: dict[str, Any]
    curves: dict[str, Any] = field(default_factory=dict)  # arrays for the plots


def _triggers(ref: Referral, kinds: tuple[str, ...]) -> dict[str, int]:
    """How many inputs each kind of trigger referred (an input can have several)."""
    return {k: sum(k in t for t in ref.triggers) for k in kinds}


def _trigger_rates(ref: Referral, kinds: tuple[str, ...]) -> dict[str, float]:
    """The share of inputs each kind of trigger referred, to set against its nominal rate."""
    n = max(len(ref.triggers), 1)
    return {k: c / n for k, c in _triggers(ref, kinds).items()}


def _expected(n: int, level: float, m: int) -> dict[str, float]:
    """What a correct conformal method would show on m rows: mean coverage and its sd."""
    mean, sd = conformal.coverage_spread(n, level, m)
    return {"expected_coverage": mean, "expected_coverage_sd": sd}


def _referral(
    ref: Referral, error: np.ndarray, kind: str, kinds: tuple[str, ...]
) -> dict[str, Any]:
    """Referral rate, and the error (rate or RMSE) among the kept and the referred inputs."""
    keep = ~ref.refer

    def err(mask: np.ndarray) -> float | None:
        if not mask.any():
            return None
        e = error[mask]
        return float(np.sqrt(np.mean(e**2))) if kind == "rmse" else float(np.mean(e))

    return {
        "rate": float(ref.refer.mean()),
        "extrapolation_rate": float(ref.extrapolation.mean()),
        f"{kind}_not_referred": err(keep),
        f"{kind}_referred": err(ref.refer),
        f"{kind}_all": err(np.ones_like(keep)),
        "triggers": _triggers(ref, kinds),
        "trigger_rates": _trigger_rates(ref, kinds),
    }


def _regression(served: ServedModel, out: np.ndarray, req: MCRequest, y: np.ndarray) -> Evaluation:
    cal = served.calibrator
    methods: list[IntervalMethod] = ["gaussian", "conformal"] if cal.calibrated else ["gaussian"]
    preds = {}
    for method in methods:
        params = PredictParams(req.samples, LEVELS, req.seed, "mc", method)
        preds[method] = served.summarize(out, req, params)
    s = preds["gaussian"].summary
    assert isinstance(s, RegressionSummary)
    mean, std = s.mean[:, 0], s.std[:, 0]
    means, noise = heads.split(out, served.manifest.aleatoric)
    # The predictive mixture's own density when the model has noise; without noise a mixture of
    # point masses has none, so the Gaussian of its mean and std stands in.
    ll = (
        metrics.mixture_log_likelihood(
            means[..., 0], y, noise if np.ndim(noise) == 0 else np.asarray(noise)[..., 0]
        )
        if noise is not None
        else metrics.gaussian_log_likelihood(mean, std, y)
    )
    intervals: dict[str, list[dict[str, Any]]] = {}
    for method, pred in preds.items():
        summary = pred.summary
        assert isinstance(summary, RegressionSummary)
        n = cal.calibration.n if method == "conformal" and cal.calibration is not None else 0
        intervals[method] = [
            {
                "level": iv.level,
                "coverage": metrics.picp(y, iv.lower[:, 0], iv.upper[:, 0]),
                "mean_width": metrics.mean_width(iv.lower[:, 0], iv.upper[:, 0]),
            }
            # the finite-sample expectation is conformal's: other intervals promise nothing
            | (_expected(n, iv.level, y.size) if n else {})
            for iv in summary.intervals
        ]
    curves: dict[str, Any] = {"levels": list(CURVE_LEVELS)}
    for method in methods:
        cover = []
        for level in CURVE_LEVELS:
            z = NormalDist().inv_cdf(0.5 + level / 2.0)
            q = z if method == "gaussian" else cal.q(level)
            lo, hi = conformal.interval(mean, std, q)
            cover.append(metrics.picp(y, lo, hi))
        curves[method] = cover
    numbers = {
        "rmse": metrics.rmse(mean, y),
        "mae": float(np.mean(np.abs(mean - y))),
        "mean_log_likelihood": float(np.mean(ll)),
        "log_likelihood": _ll_kind(served),
        "mean_std": float(np.mean(std)),
        "mean_epistemic_std": float(np.mean(s.epistemic_std[:, 0])),
        "intervals": intervals,
        "mean_aleatoric_std": float(np.mean(s.aleatoric_std[:, 0])),
        # At the policy's level, where its thresholds were derived (not LEVELS[0]).
        "referral": _referral(
            served.calibrator.referral(s, req.x),
            mean - y,
            "rmse",
            # The aleatoric trigger exists only for a learned noise head.
            ("epistemic", "aleatoric", "interval_width", "extrapolation")
            if served.manifest.aleatoric.kind == "heteroscedastic"
            else ("epistemic", "interval_width", "extrapolation"),
        ),
        "warnings": preds[methods[-1]].warnings,
    }
    return Evaluation(numbers, curves)


def _ll_kind(served: ServedModel) -> str:
    kind = served.manifest.aleatoric.kind
    if kind == "heteroscedastic":
        return "MC mixture of the passes' learned Gaussians"
    return (
        "MC mixture with the noise variance" if kind == "homoscedastic" else "gaussian(mean, std)"
    )


def _classification_metrics(probs: np.ndarray, y: np.ndarray) -> dict[str, float]:
    return {
        "accuracy": metrics.accuracy(probs, y),
        "nll": metrics.nll(probs, y),
        "brier": metrics.brier(probs, y),
        "ece": metrics.ece(probs, y),
    }


def _multi_label(
    pred: np.ndarray, y: np.ndarray, groups: np.ndarray | None, k: int
) -> dict[str, Any] | None:
    """Lenient reading where some text carries several labels (rows sharing a text)."""
    if groups is None:
        return None
    lenient = metrics.lenient_targets(pred, y, groups)
    distinct = len(set(groups.tolist()))
    return {
        "texts": distinct,
        "rows_of_multi_label_texts": int(np.sum(np.bincount(groups)[groups] > 1)),
        "accuracy": float(np.mean(pred == lenient)),
        "macro_f1": metrics.macro_f1(pred, lenient, k),
    }


def uncertainty_scores(s: ClassificationSummary) -> dict[str, np.ndarray]:
    """Per input, each score a classifier's errors are ranked by (higher: less sure)."""
    return {
        "mutual_information": s.mutual_information,
        "predictive_entropy": s.predictive_entropy,
        "variation_ratio": s.variation_ratio,
        "one_minus_max_probability": 1.0 - s.probabilities.max(axis=1),
    }


def _classification(
    served: ServedModel,
    out: np.ndarray,
    req: MCRequest,
    y: np.ndarray,
    groups: np.ndarray | None = None,
) -> Evaluation:
    pred = served.summarize(out, req, PredictParams(req.samples, LEVELS, req.seed))
    s = pred.summary
    assert isinstance(s, ClassificationSummary)
    raw = summarize_classification(out, levels=(0.5,), temperature=1.0)
    error = (s.label != y).astype(np.float64)
    scores = uncertainty_scores(s)
    k = s.probabilities.shape[1]
    curves: dict[str, Any] = {
        "reliability": {
            "served": metrics.reliability(s.probabilities, y),
            "temperature_1": metrics.reliability(raw.probabilities, y),
        },
        "risk_coverage": {k: metrics.risk_coverage(v, error) for k, v in scores.items()},
    }
    sets = [
        {
            "level": ps.level,
            "coverage": metrics.set_coverage(ps.members, y),
            "mean_size": metrics.mean_set_size(ps.members),
            "empty": float((ps.members.sum(axis=1) == 0).mean()),
            "singleton": float((ps.members.sum(axis=1) == 1).mean()),
            "threshold": ps.threshold,
        }
        | _expected(len(served.manifest.calibration.scores), ps.level, y.size)
        for ps in s.prediction_sets
        if served.manifest.calibration is not None
    ]
    numbers = {
        "served": _classification_metrics(s.probabilities, y),
        "temperature_1": _classification_metrics(raw.probabilities, y),
        "temperature": s.temperature,
        **_vector(served),
        "macro_f1": metrics.macro_f1(s.label, y, k),
        "lenient": _multi_label(s.label, y, groups, k),
        "ece_bins": metrics.ECE_BINS,
        "ece_if_calibrated": metrics.ece_if_calibrated(s.probabilities) | {"rows": y.size},
        "errors": int(error.sum()),
        "error_detection_auroc": {k: metrics.auroc(v, error > 0) for k, v in scores.items()},
        "aurc": {k: metrics.aurc(v, error) for k, v in scores.items()},
        "prediction_sets": sets,
        # At the policy's level, where its thresholds were derived (not LEVELS[0]).
        "referral": _referral(
            served.calibrator.referral(s, req.x),
            error,
            "error_rate",
            ("epistemic", "prediction_set", "extrapolation"),
        ),
        # Per-class intervals are not evaluated, so their sample-count note does not apply.
        "warnings": [w for w in pred.warnings if not w.startswith("per-class intervals")],
    }
    return Evaluation(numbers, curves)


def _vector(served: ServedModel) -> dict[str, Any]:
    """Vector scaling's per-class scale and bias, when the bundle has them."""
    cal = served.calibrator
    scale, bias = cal.class_scale, cal.class_bias
    if scale is None or bias is None:
        return {}
    return {"class_scale": scale.tolist(), "class_bias": bias.tolist()}


def evaluate(served: ServedModel, data: Labelled, *, samples: int, seed: int = 0) -> Evaluation:
    """Everything the report shows, for ``data`` through ``served`` with ``samples`` passes."""
    m = served.manifest
    if m.outputs.targets is not None:
        raise InvalidInputError(
            f"{m.name}: evaluate scores one target; this model has {len(m.outputs.targets)} "
            "(multi-output evaluation is not implemented yet)"
        )
    req = MCRequest(data.x, samples, seed, sites=m.sampled_sites)  # the sites it serves with
    out = served.sample([req])[0]  # [T, N, outputs]
    y = data.y
    ev = (
        _classification(served, out, req, y, data.groups)
        if m.task == "classification"
        else _regression(served, out, req, y.astype(np.float64))
    )
    warnings = [
        *data.notes,
        *overlaps(data, m, "evaluation", ("train", "calibration"), calibrated=True),
    ]
    ev.numbers = {
        "model": {
            "name": m.name,
            "version": m.version,
            "digest": served.digest,
            "task": m.task,
            "calibration": served.calibrator.metadata(),
            "referral": served.calibrator.policy.model_dump(mode="json"),
        },
        "data": {"file": data.path.name, "sha256": data.sha256, "rows": data.n},
        "samples": samples,
        "seed": seed,
        "overlap_warnings": warnings,
    } | ev.numbers
    return ev


def finite_or_none(value: Any) -> Any:
    """JSON has no infinity: unbounded widths and thresholds become null, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_none(v) for v in value]
    return value
