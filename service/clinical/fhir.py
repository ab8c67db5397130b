"""FHIR resources for a prediction: a RiskAssessment (classifier) or an Observation (regressor).

R4B by default, R5 by setting (`fhir_version`); the two differ here only in Device's name and
type fields. Every resource is validated with `fhir.resources` and against the invariants that
library does not check (validation.py).

Conventions (docs/CLINICAL.md): the model is a contained Device (`#model`) naming its version
and digest, referenced as RiskAssessment.performer or Observation.device; status `preliminary`
when the prediction is referred to a human (with the reasons in a note), else `final`. A Monte
Carlo answer carries its interval: `probabilityRange` in percent for a classifier (the mean in
`rationale`), `valueQuantity` with the iso21090 uncertainty extensions plus the interval in a
component for a regressor. A deterministic answer (dropout off) carries a point only:
`probabilityDecimal` in percent, or a bare valueQuantity. Every resource is labelled AI asserted
(`meta.security` v3-ObservationValue#AIAST, as the AI Transparency on FHIR draft suggests).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import numpy as np

from service.clinical.mapping import Mapping
from service.clinical.terms import UCUM
from service.clinical.validation import UNCERTAINTY, FhirVersion, Json, validate
from service.engine.model import Prediction, ServedModel
from service.engine.summaries import ClassificationSummary, Interval, RegressionSummary

CODE_SYSTEMS = "https://mcserve.example/fhir/CodeSystem"  # this service's own code systems
SYSTEM = f"{CODE_SYSTEMS}/mcserve"  # this service's own codes
AIAST = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "AIAST",
    "display": "Artificial Intelligence asserted",
}
UNCERTAINTY_TYPE = "http://hl7.org/fhir/StructureDefinition/iso21090-uncertaintyType"
DEVICE_ID = "model"


@dataclass(frozen=True)
class Context:
    """What a resource needs besides the prediction."""

    subject: str  # "Patient/123"
    when: datetime
    basis: list[str] = field(default_factory=list)  # references of the inputs used
    encounter: str | None = None
    version: FhirVersion = "R4B"
    mapping: Mapping | None = None


def num(v: float, digits: int = 6) -> float:
    """A float with `digits` significant digits (no binary noise in the JSON)."""
    return float(f"{float(v):.{digits}g}")


def pct(p: float) -> Json:
    return {
        "value": num(min(max(p * 100.0, 0.0), 100.0), 4),
        "unit": "%",
        "system": UCUM,
        "code": "%",
    }


def referred(pred: Prediction, i: int) -> list[str]:
    """The reasons a human should look at input i (empty when not referred)."""
    r = pred.referral
    if r is None or not bool(r.refer[i]):
        return []
    return list(r.reasons[i]) or ["referred by the model's policy"]


def first_interval(pred: Prediction) -> Interval | None:
    s = pred.summary
    return s.intervals[0] if s is not None and s.intervals else None


def device(model: ServedModel, version: FhirVersion) -> Json:
    name = f"mcserve {model.name}"
    kind = {"text": "Machine-learning model (Monte Carlo dropout)"}
    out: Json = {"resourceType": "Device", "id": DEVICE_ID, "status": "active"}
    if version == "R5":
        out |= {"name": [{"value": name, "type": "user-friendly-name"}], "type": [kind]}
    else:
        out |= {"deviceName": [{"name": name, "type": "user-friendly-name"}], "type": kind}
    out["version"] = [
        {"type": {"text": "model version"}, "value": model.version},
        {"type": {"text": "bundle digest"}, "value": model.digest},
    ]
    out["note"] = [{"text": f"Intended use: {model.manifest.intended_use}"}]
    return out


def method_text(model: ServedModel, pred: Prediction) -> str:
    where = f"{pred.backend} on {pred.device}"
    if pred.mode == "deterministic":
        return f"Dropout off (deterministic, {where}): no uncertainty computed"
    iv = first_interval(pred)
    cal = "calibrated (split-conformal)" if model.calibrator.calibrated else "not calibrated"
    interval = f"{iv.level * 100:g} % interval: {iv.method}; " if iv is not None else ""
    return (
        f"Monte Carlo dropout, {pred.samples} passes (seed {pred.seed}, {where}); {interval}{cal}"
    )


def method(model: ServedModel, pred: Prediction) -> Json:
    code = "mc-dropout" if pred.mode == "mc" else "deterministic"
    display = "Monte Carlo dropout" if pred.mode == "mc" else "Dropout off"
    return {
        "coding": [{"system": SYSTEM, "code": code, "display": display}],
        "text": method_text(model, pred),
    }


def _common(model: ServedModel, pred: Prediction, i: int, ctx: Context) -> tuple[Json, Json]:
    """The head every resource shares, and its tail (notes)."""
    head: Json = {
        "meta": {"security": [AIAST]},
        "contained": [device(model, ctx.version)],
        "status": "preliminary" if referred(pred, i) else "final",
    }
    notes = [{"text": "Referred for clinician review: " + "; ".join(referred(pred, i))}]
    if not referred(pred, i):
        notes = []
    if pred.mode == "deterministic":
        notes.append({"text": "Dropout off: no uncertainty was computed for this value."})
    read = (pred.input_notes or [])[i] if i < len(pred.input_notes or []) else {}
    text, audio = model.manifest.inputs.text, model.manifest.inputs.audio
    if read.get("truncated") and text is not None:  # the JSON answer said so; FHIR did not
        notes.append(
            {
                "text": f"The text was cut to its first {text.max_tokens} of {read['tokens']} "
                "tokens: the rest was not read."
            }
        )
    if read.get("truncated") and audio is not None:
        notes.append(
            {
                "text": f"The clip was cut to its first {audio.seconds:g} of {read['seconds']:g} "
                "seconds: the rest was not heard."
            }
        )
    rate = read.get("sample_rate")
    if audio is not None and isinstance(rate, int) and rate != audio.sample_rate:
        said = f"The clip was resampled from {rate} Hz to the model's {audio.sample_rate} Hz."
        notes.append({"text": said})
    return head, {"note": notes} if notes else {}


def _outcomes(model: ServedModel, ctx: Context) -> list[tuple[int, Json]]:
    labels = model.manifest.outputs.labels or []
    m = ctx.mapping
    if m is not None and m.outcome in labels:
        concept: Json = {"text": m.concept.text}
        if m.concept.coding:
            concept["coding"] = [c.coding() for c in m.concept.coding]
        return [(labels.index(m.outcome), concept)]
    return [(k, {"text": label}) for k, label in enumerate(labels)]


def risk_assessment(model: ServedModel, pred: Prediction, i: int, ctx: Context) -> Json:
    head, tail = _common(model, pred, i, ctx)
    labels = model.manifest.outputs.labels or []
    predictions = []
    for k, concept in _outcomes(model, ctx):
        entry: Json = {"outcome": concept}
        if pred.point is not None:
            entry["probabilityDecimal"] = pct(float(pred.point[i, k]))["value"]
        else:
            s = pred.summary
            assert isinstance(s, ClassificationSummary)
            p = float(s.probabilities[i, k])
            iv = first_interval(pred)
            mean = f"mean p({labels[k]}) = {p * 100:.1f} % over {s.samples} passes"
            if iv is None:
                entry["probabilityDecimal"] = pct(p)["value"]
                entry["rationale"] = mean
            else:
                lo, hi = float(iv.lower[i, k]), float(iv.upper[i, k])
                entry["probabilityRange"] = {"low": pct(lo), "high": pct(hi)}
                entry["rationale"] = (
                    f"{mean}; the range is its {iv.level * 100:g} % interval ({iv.method} of "
                    "the per-pass probabilities)"
                )
        predictions.append(entry)
    out: Json = {"resourceType": "RiskAssessment", **head, "subject": {"reference": ctx.subject}}
    if ctx.encounter:
        out["encounter"] = {"reference": ctx.encounter}
    out |= {
        "occurrenceDateTime": ctx.when.isoformat(),
        "method": method(model, pred),
        "performer": {"reference": f"#{DEVICE_ID}", "display": f"mcserve {model.name}"},
    }
    if ctx.basis:
        out["basis"] = [{"reference": r} for r in ctx.basis]
    out["prediction"] = predictions
    return out | tail


def _quantity(value: float, model: ServedModel, ctx: Context) -> Json:
    q: Json = {"value": num(value)}
    unit = ctx.mapping.unit if ctx.mapping is not None else None
    if unit is not None:
        q |= {"unit": unit.display or unit.code, "system": unit.system, "code": unit.code}
    elif model.manifest.outputs.unit:
        q["unit"] = model.manifest.outputs.unit
    return q


def observation(model: ServedModel, pred: Prediction, i: int, ctx: Context) -> Json:
    head, tail = _common(model, pred, i, ctx)
    m, target = ctx.mapping, model.manifest.outputs.target or "prediction"
    code: Json = {"text": m.concept.text if m else target}
    if m and m.concept.coding:
        code["coding"] = [c.coding() for c in m.concept.coding]
    out: Json = {"resourceType": "Observation", **head, "code": code}
    out["subject"] = {"reference": ctx.subject}
    if ctx.encounter:
        out["encounter"] = {"reference": ctx.encounter}
    out |= {
        "effectiveDateTime": ctx.when.isoformat(),
        "issued": ctx.when.isoformat(),
    }
    components = []
    if pred.point is not None:
        out["valueQuantity"] = _quantity(float(pred.point[i, 0]), model, ctx)
    else:
        s = pred.summary
        assert isinstance(s, RegressionSummary)
        q = _quantity(float(s.mean[i, 0]), model, ctx)
        ext = [{"url": UNCERTAINTY, "valueDecimal": num(float(s.std[i, 0]))}]
        iv = first_interval(pred)
        if iv is not None and iv.method == "gaussian":
            ext.append({"url": UNCERTAINTY_TYPE, "valueCode": "N"})
        out["valueQuantity"] = {"extension": ext, **q}
        if iv is not None and np.isfinite([iv.lower[i, 0], iv.upper[i, 0]]).all():
            components.append(
                {
                    "code": {
                        "coding": [
                            {
                                "system": SYSTEM,
                                "code": "prediction-interval",
                                "display": "Prediction interval",
                            }
                        ],
                        "text": f"{iv.level * 100:g} % prediction interval ({iv.method})",
                    },
                    "valueRange": {
                        "low": _quantity(float(iv.lower[i, 0]), model, ctx),
                        "high": _quantity(float(iv.upper[i, 0]), model, ctx),
                    },
                }
            )
    out["method"] = method(model, pred)
    out["device"] = {"reference": f"#{DEVICE_ID}", "display": f"mcserve {model.name}"}
    observations = [r for r in ctx.basis if r.startswith("Observation/")]
    if observations:
        out["derivedFrom"] = [{"reference": r} for r in observations]
    if components:
        out["component"] = components
    return out | tail


def resource(model: ServedModel, pred: Prediction, i: int, ctx: Context) -> Json:
    """The validated resource for input i of `pred` (ValueError if it breaks a rule)."""
    if model.manifest.task == "classification":
        out = risk_assessment(model, pred, i, ctx)
    else:
        out = observation(model, pred, i, ctx)
    validate(out, ctx.version)
    return out


def bundle(resources: list[Json]) -> Json:
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": r} for r in resources],
    }


def operation_outcome(code: str, message: str, issues: list[Json] | None = None) -> Json:
    """An OperationOutcome: the given issues, else one `code` issue saying `message`."""
    if not issues:
        issues = [{"severity": "error", "code": code, "diagnostics": message}]
    return {"resourceType": "OperationOutcome", "issue": issues}


def answer(model: ServedModel, pred: Prediction, ctx: Context) -> Json:
    """The native API's FHIR answer: one resource per input, a collection Bundle for several."""
    s = pred.summary
    if pred.point is not None:
        n = pred.point.shape[0]
    elif isinstance(s, RegressionSummary):
        n = s.mean.shape[0]
    else:
        assert isinstance(s, ClassificationSummary)
        n = s.probabilities.shape[0]
    out = [resource(model, pred, i, ctx) for i in range(n)]
    return out[0] if n == 1 else bundle(out)
