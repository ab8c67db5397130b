"""The card a clinician sees: one per prediction, with everything needed to review its basis.

CDS Hooks 2.0 card: `uuid` (named by feedback), `summary` (< 140 characters: the prediction and
its interval), `indicator` (`info`, `warning` when referred), `source.label`, a Markdown
`detail` (inputs with value, unit, date and source; model name, version and digest; passes,
interval method and level; calibration; referral reasons; assumptions; intended use), one
suggestion whose action creates the FHIR resource, and `overrideReasons`. No key ever holds
null, "", [] or {} (the specification forbids them): optional parts are left out instead.
Wording describes, never directs (FDA CDS criterion 4: the clinician reviews the basis).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from service.clinical.extracted import Extraction, Used
from service.clinical.fhir import CODE_SYSTEMS, SYSTEM, first_interval, referred
from service.clinical.mapping import Mapping
from service.clinical.validation import empties
from service.engine.model import Prediction, ServedModel
from service.engine.summaries import ClassificationSummary, RegressionSummary

Json = dict[str, Any]
MAX_SUMMARY = 139  # "< 140 characters"
FLAG = "; uncertain, flagged for review"
OVERRIDE_SYSTEM = f"{CODE_SYSTEMS}/override-reason"
OVERRIDE_REASONS = [
    ("clinical-judgement", "Clinical judgement differs"),
    ("inputs-inaccurate", "Inputs are inaccurate or out of date"),
    ("not-applicable", "Model not applicable to this patient"),
]


@dataclass(frozen=True)
class Issued:
    card: Json
    suggestion: str  # the suggestion's uuid (feedback's acceptedSuggestions name it)
    referred: bool


def fmt(v: float) -> str:
    """Three significant digits, no exponent for ordinary clinical magnitudes."""
    if abs(v) >= 999.5:  # after rounding to 3 digits: 999.6 was shown as "1e+03"
        return f"{v:.0f}"
    return f"{v:.3g}"


def fmt_pct(p: float) -> str:
    """A probability in percent: whole numbers in 1..99, more digits near 0 and 100 %."""
    x = p * 100.0
    if 1.0 <= x <= 99.0:
        return f"{x:.0f}"
    if x >= 99.995:
        return "> 99.99"
    if x < 0.005:
        return "< 0.01"
    return f"{x:.2f}".rstrip("0").rstrip(".")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def summary(mapping: Mapping, model: ServedModel, pred: Prediction, i: int) -> str:
    iv = first_interval(pred)
    s = pred.summary
    if isinstance(s, ClassificationSummary):
        k = (model.manifest.outputs.labels or []).index(mapping.outcome or "")
        text = f"{mapping.summary}: {fmt_pct(float(s.probabilities[i, k]))} %"
        if iv is not None:
            lo, hi = fmt_pct(float(iv.lower[i, k])), fmt_pct(float(iv.upper[i, k]))
            text += f" ({iv.level * 100:g} % interval {lo} to {hi} %)"
    else:
        assert isinstance(s, RegressionSummary)
        text = f"{mapping.summary}: {fmt(float(s.mean[i, 0]))}"
        if iv is not None:
            lo, hi = fmt(float(iv.lower[i, 0])), fmt(float(iv.upper[i, 0]))
            text += f" ({iv.level * 100:g} % interval {lo} to {hi})"
    if referred(pred, i):
        text += FLAG
    return text if len(text) <= MAX_SUMMARY else text[: MAX_SUMMARY - 1] + "…"


def _result(mapping: Mapping, model: ServedModel, pred: Prediction, i: int) -> list[str]:
    iv = first_interval(pred)
    s = pred.summary
    lines = []
    if isinstance(s, ClassificationSummary):
        labels = model.manifest.outputs.labels or []
        k = labels.index(mapping.outcome or "")
        line = (
            f"**{mapping.concept.text}**: p({labels[k]}) = **{s.probabilities[i, k] * 100:.1f} %**"
            f" (mean over {s.samples} Monte Carlo dropout passes)"
        )
        if iv is not None:
            line += (
                f"; {iv.level * 100:g} % interval {iv.lower[i, k] * 100:.1f} to "
                f"{iv.upper[i, k] * 100:.1f} % ({iv.method} of the per-pass probabilities)"
            )
        lines.append(line + ".")
        lines.append(
            f"Uncertainty: mutual information {s.mutual_information[i]:.3g} nats (epistemic), "
            f"predictive entropy {s.predictive_entropy[i]:.3g} nats."
        )
    else:
        assert isinstance(s, RegressionSummary)
        unit = f" {mapping.unit.display or mapping.unit.code}" if mapping.unit else ""
        line = f"**{mapping.concept.text}**: **{fmt(float(s.mean[i, 0]))}**{unit}"
        if iv is not None:
            line += (
                f"; {iv.level * 100:g} % interval {fmt(float(iv.lower[i, 0]))} to "
                f"{fmt(float(iv.upper[i, 0]))} ({iv.method})"
            )
        lines.append(line + ".")
        lines.append(
            f"Uncertainty: predictive standard deviation {fmt(float(s.std[i, 0]))} (epistemic "
            f"{fmt(float(s.epistemic_std[i, 0]))}, aleatoric {fmt(float(s.aleatoric_std[i, 0]))});"
            f" Monte Carlo standard error {fmt(float(s.mc_standard_error[i, 0]))}."
        )
    return lines


def _row(u: Used) -> str:
    value = fmt(u.value) + (f" (sent as {u.given})" if u.given else "")
    if u.formula:
        when, source = "–", f"derived: {u.formula}"
    else:
        when = u.date or "–"
        source = u.source or "–"
        if u.code:
            source += f" ({u.code})"
    cells = [u.title, value, u.unit, when, source]
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def detail(mapping: Mapping, model: ServedModel, pred: Prediction, i: int, ex: Extraction) -> str:
    reasons = referred(pred, i)
    parts = [" ".join(_result(mapping, model, pred, i))]
    if reasons:
        parts.append(
            "**Referred for clinician review** (the model's referral policy):\n"
            + "\n".join(f"- {r}" for r in reasons)
        )
    else:
        parts.append("Not referred: no trigger of the model's referral policy fired.")
    table = ["| input | value | unit | date | source |", "|---|---|---|---|---|"]
    table += [_row(u) for u in ex.used.values()]
    parts.append("### Inputs used\n" + "\n".join(table))
    if ex.skipped:  # an older result was used: say which newer ones were not, and why
        parts.append("### Results not used\n" + "\n".join(f"- {_cell(s)}" for s in ex.skipped))
    iv = first_interval(pred)
    cal = model.calibrator
    calibration = (
        f"calibrated (split-conformal, {cal.calibration.n} cases)"
        if cal.calibration is not None
        else "not calibrated: the interval is model-based, without a coverage guarantee"
    )
    facts = [
        f"- Model: **{model.name}** version {model.version}, digest `{model.digest}`",
        f"- Method: Monte Carlo dropout, {pred.samples} passes, seed {pred.seed} "
        f"({pred.backend} on {pred.device})",
    ]
    if iv is not None:
        facts.append(f"- Interval: {iv.level * 100:g} %, {iv.method}")
    facts.append(f"- Calibration: {calibration}")
    facts += [f"- Note: {w}" for w in pred.warnings]
    parts.append("### Model\n" + "\n".join(facts))
    if mapping.assumptions:
        parts.append("### Assumptions\n" + "\n".join(f"- {a}" for a in mapping.assumptions))
    parts.append("### Intended use\n" + model.manifest.intended_use)
    return "\n\n".join(parts)


def source(model: ServedModel, base_url: str | None, page: bool = False) -> Json:
    """The card's source; with the public base URL, `url` is the model's page (its card,
    calibration and a form to try it; docs/PAGES.md) or, with pages off, its JSON metadata,
    absolute as CDS Hooks requires."""
    out: Json = {
        "label": f"mcserve: {model.name} {model.version}",
        "topic": {"system": SYSTEM, "code": "ml-prediction", "display": "ML prediction"},
    }
    if base_url:
        name, version = quote(model.name, safe=""), quote(model.version, safe="")
        where = "/models" if page else "/v1/models"
        out["url"] = f"{base_url.rstrip('/')}{where}/{name}/versions/{version}"
    return out


def links(model: ServedModel, src: Json) -> Json:
    """`links`: the model's page (or metadata), when the source has a URL."""
    if "url" not in src:
        return {}
    label = f"Model {model.name} version {model.version}: metadata, intended use, calibration"
    return {"links": [{"label": label, "url": src["url"], "type": "absolute"}]}


def card(
    mapping: Mapping,
    model: ServedModel,
    pred: Prediction,
    i: int,
    ex: Extraction,
    resource: Json,
    card_id: str | None = None,
    base_url: str | None = None,
    page: bool = False,
) -> Issued:
    is_referred = bool(referred(pred, i))
    kind = resource["resourceType"]
    src = source(model, base_url, page)
    suggestion = str(uuid.uuid4())
    out: Json = {
        "uuid": card_id or str(uuid.uuid4()),
        "summary": summary(mapping, model, pred, i),
        "detail": detail(mapping, model, pred, i, ex),
        "indicator": "warning" if is_referred else "info",
        "source": src,
        **links(model, src),
        "suggestions": [
            {
                "label": f"Record this prediction in the chart ({kind}, status "
                f"{resource['status']})",
                "uuid": suggestion,
                "actions": [
                    {
                        "type": "create",
                        "description": f"Create {'an' if kind[0] in 'AEIOU' else 'a'} {kind} "
                        f"for {ex.patient} with this prediction",
                        "resource": resource,
                    }
                ],
            }
        ],
        "selectionBehavior": "at-most-one",
        "overrideReasons": [
            {"system": OVERRIDE_SYSTEM, "code": c, "display": d} for c, d in OVERRIDE_REASONS
        ],
    }
    bad = empties(out)
    if bad:  # a bug, never the client's fault
        raise ValueError(f"card has empty values at {bad}")
    return Issued(out, suggestion, is_referred)


# What would make a prediction possible, per OperationOutcome issue code (extraction.py).
REMEDY = {
    "required": "a final result (or Patient data) sent in the prefetch",
    "business-rule": "a result within the allowed age",
    "code-invalid": "a result in a unit that converts to the model's (UCUM)",
    "value": "a measured value the model can use",
    "security": "a FHIR server and access token this service may use (fhir_servers, scope)",
    "transient": "a FHIR server that answers",
    # Fetching from the EHR's FHIR server (fetch.py, search.py):
    "timeout": "a FHIR server that answers in time",
    "login": "a current access token in fhirAuthorization (the one sent was refused)",
    "forbidden": "an access token that allows reading these resources",
    "too-costly": "a FHIR server answer within the size and page limits",
    "structure": "valid FHIR from the FHIR server",
    "processing": "a FHIR server that answers the search it was sent",
}


def missing(
    mapping: Mapping,
    model: ServedModel,
    issues: list[Json],
    card_id: str,
    base_url: str | None = None,
    page: bool = False,
) -> Json:
    """An `info` card saying no prediction was made, what was missing or unusable, and what would
    make one possible (the default answer to missing data: a 412 is never shown to clinicians).
    """
    names = list(
        dict.fromkeys(str(i["details"]["text"]) for i in issues if i["severity"] == "error")
    )
    head = f"{mapping.summary}: no prediction, missing or unusable input"
    text = f"{head}: {', '.join(names)}"
    if len(text) > MAX_SUMMARY:
        text = f"{head}s ({len(names)})"
    lines = [
        "**No prediction was made**: the model needs every one of its inputs, and these could "
        "not be used:",
        *(f"- {_cell(str(i['diagnostics']))}" for i in issues),
        "",
        "A prediction becomes possible with "
        + "; ".join(dict.fromkeys(REMEDY.get(str(i["code"]), "usable data") for i in issues))
        + ". Nothing was computed and nothing is suggested for the chart.",
        "",
        f"Model: {model.name} version {model.version}. {model.manifest.intended_use}",
    ]
    src = source(model, base_url, page)
    out: Json = {
        "uuid": card_id,
        "summary": text[:MAX_SUMMARY],
        "detail": "\n".join(lines),
        "indicator": "info",
        "source": src,
        **links(model, src),
    }
    bad = empties(out)
    if bad:  # a bug, never the client's fault
        raise ValueError(f"card has empty values at {bad}")
    return out
