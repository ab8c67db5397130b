"""Engine results (numpy, batch-first) to JSON-ready dicts of the native API.

Below `api/` and `audit/`: the audit record keeps exactly the JSON the native route answers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

from service.engine.model import Prediction, ServedModel
from service.engine.prediction import source
from service.engine.referral import Referral
from service.engine.summaries import ClassificationSummary, RegressionSummary


def _intervals_regression(s: RegressionSummary, i: int, d: int = 0) -> list[dict[str, Any]]:
    return [
        {
            "level": iv.level,
            "lower": _bound(float(iv.lower[i, d])),
            "upper": _bound(float(iv.upper[i, d])),
            "method": iv.method,
        }
        for iv in s.intervals
    ]


def _bound(v: float) -> float | None:
    # An unbounded conformal interval (calibration set too small for the level) is null in JSON.
    return v if np.isfinite(v) else None


def referrals(r: Referral | None, n: int) -> list[dict[str, Any] | None]:
    if r is None:
        return [None] * n
    refer, ext = r.refer.tolist(), r.extrapolation.tolist()
    return [
        {
            "refer": refer[i],
            "reasons": list(r.reasons[i]),
            "triggers": list(r.triggers[i]),
            "extrapolation": ext[i],
        }
        for i in range(n)
    ]


def regression_targets(
    s: RegressionSummary, names: list[str], referral: Referral | None = None
) -> list[dict[str, Any]]:
    """A multi-output regressor's predictions: per input, each target's summary by name."""
    cols = {
        k: getattr(s, k).tolist()
        for k in ("mean", "std", "epistemic_std", "aleatoric_std", "mc_standard_error")
    }
    refs = referrals(referral, s.mean.shape[0])
    out = []
    for i in range(s.mean.shape[0]):
        targets = {
            name: {k: v[i][d] for k, v in cols.items() if k != "mc_standard_error"}
            | {"intervals": _intervals_regression(s, i, d)}
            | {"mc_standard_error": cols["mc_standard_error"][i][d]}
            for d, name in enumerate(names)
        }
        row: dict[str, Any] = {"targets": targets}
        if refs[i] is not None:
            row["referral"] = refs[i]
        out.append(row)
    return out


def regression(s: RegressionSummary, referral: Referral | None = None) -> list[dict[str, Any]]:
    mean, std = s.mean[:, 0].tolist(), s.std[:, 0].tolist()
    epi, ale = s.epistemic_std[:, 0].tolist(), s.aleatoric_std[:, 0].tolist()
    se = s.mc_standard_error[:, 0].tolist()
    refs = referrals(referral, len(mean))
    return [
        {
            "mean": mean[i],
            "std": std[i],
            "epistemic_std": epi[i],
            "aleatoric_std": ale[i],
            "intervals": _intervals_regression(s, i),
            "mc_standard_error": se[i],
        }
        | ({"referral": refs[i]} if refs[i] is not None else {})
        for i in range(len(mean))
    ]


def classification(
    s: ClassificationSummary, labels: list[str], referral: Referral | None = None
) -> list[dict[str, Any]]:
    probs, std, se = s.probabilities.tolist(), s.probability_std.tolist(), s.probability_se.tolist()
    label = s.label.tolist()
    h, eh = s.predictive_entropy.tolist(), s.expected_entropy.tolist()
    mi, vr = s.mutual_information.tolist(), s.variation_ratio.tolist()
    ivs = [(iv.level, iv.method, iv.lower.tolist(), iv.upper.tolist()) for iv in s.intervals]
    refs = referrals(referral, len(label))
    # The native answer carries the set at the first requested level (the engine has them all).
    first_set = s.prediction_sets[0] if s.prediction_sets else None
    out = []
    for i in range(len(label)):
        extra: dict[str, Any] = {}
        if first_set is not None:
            members = first_set.members[i]
            extra["prediction_set"] = {
                "level": first_set.level,
                "labels": [lab for k, lab in enumerate(labels) if members[k]],
            }
        if refs[i] is not None:
            extra["referral"] = refs[i]
        out.append(
            {
                "label": labels[label[i]],
                "probabilities": dict(zip(labels, probs[i], strict=True)),
                "probability_std": dict(zip(labels, std[i], strict=True)),
                "probability_se": dict(zip(labels, se[i], strict=True)),
                "intervals": {
                    lab: [
                        {"level": lv, "lower": lo[i][k], "upper": up[i][k], "method": m}
                        for lv, m, lo, up in ivs
                    ]
                    for k, lab in enumerate(labels)
                },
                "uncertainty": {
                    "predictive_entropy": h[i],
                    "expected_entropy": eh[i],
                    "mutual_information": mi[i],
                    "variation_ratio": vr[i],
                },
            }
            | extra
        )
    return out


def deterministic(
    point: np.ndarray, labels: list[str] | None, targets: list[str] | None = None
) -> list[dict[str, Any]]:
    if targets and len(targets) > 1:
        return [
            {"targets": {name: {"mean": v} for name, v in zip(targets, row, strict=True)}}
            for row in point.tolist()
        ]
    if labels:
        rows = point.tolist()
        return [
            {
                "label": labels[int(np.argmax(r))],
                "probabilities": dict(zip(labels, r, strict=True)),
            }
            for r in rows
        ]
    return [{"mean": v} for v in point[:, 0].tolist()]


def predictions(model: ServedModel, pred: Prediction) -> list[dict[str, Any]]:
    whole, lo, hi = source(pred)
    if whole is pred:
        return _predictions(model, pred)
    # A part of a group's answer: the group's inputs are encoded once, for all its requests
    # (one tolist() per array instead of one per request), and each request takes its rows.
    # The row dicts are the group's: callers serialise them and must not change them.
    rows: list[dict[str, Any]] | None = whole.encoded.get("native_rows")
    if rows is None:
        rows = whole.encoded["native_rows"] = _predictions(model, whole)
    return rows[lo:hi]


def _predictions(model: ServedModel, pred: Prediction) -> list[dict[str, Any]]:
    labels = model.manifest.outputs.labels
    targets = [] if labels else model.manifest.outputs.target_names  # regression only
    if pred.point is not None:
        return deterministic(pred.point, labels, targets)
    if isinstance(pred.summary, ClassificationSummary):
        assert labels is not None
        return classification(pred.summary, labels, pred.referral)
    assert isinstance(pred.summary, RegressionSummary)
    if len(targets) > 1:
        return regression_targets(pred.summary, targets, pred.referral)
    return regression(pred.summary, pred.referral)


def response_json(model: ServedModel, pred: Prediction) -> bytes:
    """The native answer as JSON bytes, encoded once per prediction (answer and audit record)."""
    cached: bytes | None = pred.encoded.get("native")
    if cached is None:
        cached = pred.encoded["native"] = orjson.dumps(response(model, pred))
    return cached


def sites_used(pred: Prediction) -> str | int | None:
    """The dropout sites an MC answer sampled, as a request names them; None: deterministic."""
    if pred.mode != "mc":
        return None
    return "all" if pred.dropout_sites is None else pred.dropout_sites


DETERMINISTIC = "deterministic mode: dropout off, no uncertainty was computed"


def warnings_of(pred: Prediction) -> list[str]:
    """What an answer warns of, on /v1 and /v2 alike."""
    return [*pred.warnings, *([DETERMINISTIC] if pred.mode == "deterministic" else [])]


def response(model: ServedModel, pred: Prediction) -> dict[str, Any]:
    warnings = warnings_of(pred)
    rows = predictions(model, pred)
    if pred.input_notes is not None:  # copies: the row dicts may be shared by a group
        rows = [{**row, **note} for row, note in zip(rows, pred.input_notes, strict=True)]
    if pred.adaptive:  # samples=auto: the passes each input's answer used (copies, as above)
        rows = [{**row, "passes_used": pred.samples} for row in rows]
    return {
        "predictions": rows,
        "model": {"name": model.name, "version": model.version, "digest": model.digest},
        "backend": pred.backend,
        "device": pred.device,
        "mode": pred.mode,
        "samples": pred.samples,
        "seed": pred.seed,
        "dropout_sites": sites_used(pred),
        "uncertainty_computed": pred.mode == "mc",
        "warnings": warnings,
    }
