"""Playing the EHR: FHIR resources, prefetch and hook requests as a CDS client sends them."""

from __future__ import annotations

import csv
import math
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
CYTOLOGY = "https://mcserve.example/fhir/CodeSystem/wdbc-cytology"
PID = "p1"

# The README's example patient: age 59, sex 2, bmi 32.1, bp 101, tc 157, ldl 93.2, hdl 38,
# ltg 4.8598 (triglycerides exp(4.8598) = 129 mg/dL), glu 87.
DIABETES: dict[str, tuple[str, float, str]] = {
    "bmi": ("39156-5", 32.1, "kg/m2"),
    "bp": ("8478-0", 101.0, "mm[Hg]"),
    "tc": ("2093-3", 157.0, "mg/dL"),
    "ldl": ("2089-1", 93.2, "mg/dL"),
    "hdl": ("2085-9", 38.0, "mg/dL"),
    "tg": ("2571-8", 129.0, "mg/dL"),
    "glu": ("2345-7", 87.0, "mg/dL"),
}


def iso(t: datetime) -> str:
    return t.isoformat()


def patient(pid: str = PID, birth: str = "1965-03-01", gender: str = "female") -> dict[str, Any]:
    return {"resourceType": "Patient", "id": pid, "birthDate": birth, "gender": gender}


def observation(
    oid: str,
    system: str,
    code: str,
    value: float | None,
    unit: str | None,
    when: datetime,
    pid: str = PID,
    status: str = "final",
) -> dict[str, Any]:
    q: dict[str, Any] = {}
    if value is not None:
        q["value"] = value
    if unit is not None:
        q |= {"unit": unit, "system": UCUM, "code": unit}
    return {
        "resourceType": "Observation",
        "id": oid,
        "status": status,
        "code": {"coding": [{"system": system, "code": code}]},
        "subject": {"reference": f"Patient/{pid}"},
        "effectiveDateTime": iso(when),
        "valueQuantity": q,
    }


def searchset(*resources: dict[str, Any]) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [{"resource": r} for r in resources],
    }


def diabetes_prefetch(now: datetime, pid: str = PID, **values: Any) -> dict[str, Any]:
    """Prefetch for `diabetes-progression`; values[name] = (value, unit), (value, unit, LOINC
    code) or None (omitted)."""
    out: dict[str, Any] = {"patient": patient(pid)}
    when = now - timedelta(days=10)
    for name, (code, value, unit) in DIABETES.items():
        given = values.get(name, (value, unit))
        if given is None:
            out[name] = searchset()
            continue
        code = given[2] if len(given) > 2 else code
        out[name] = searchset(observation(f"{name}-1", LOINC, code, given[0], given[1], when, pid))
    return out


def test_rows(name: str) -> list[dict[str, float]]:
    with (MODELS / "data" / f"{name}-test.csv").open() as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def breast_rows() -> tuple[dict[str, float], dict[str, float]]:
    """The most malignant-looking and the most benign-looking test rows."""
    rows = test_rows("breast-cancer")
    score = [r["worst area"] * r["worst concave points"] for r in rows]
    return rows[score.index(max(score))], rows[score.index(min(score))]


def cytology_code(feature: str) -> str:
    for stat, suffix in (("mean ", "mean"), ("worst ", "worst")):
        if feature.startswith(stat):
            return feature[len(stat) :].replace(" ", "-") + "-" + suffix
    return feature.removesuffix(" error").replace(" ", "-") + "-se"


def cytology_unit(feature: str) -> str:
    for key, unit in (("radius", "{a.u.}"), ("perimeter", "{a.u.}"), ("area", "{a.u.2}")):
        if key in feature:
            return unit
    return "{grey-level}" if "texture" in feature else "1"


def breast_prefetch(row: dict[str, float], now: datetime, pid: str = PID) -> dict[str, Any]:
    when = now - timedelta(days=3)
    obs = [
        observation(f"fna-{i}", CYTOLOGY, cytology_code(f), v, cytology_unit(f), when, pid)
        for i, (f, v) in enumerate(row.items())
        if f != "target"
    ]
    return {"cytology": searchset(*obs)}


def hook_call(
    prefetch: dict[str, Any], hook: str = "patient-view", pid: str = PID, **context: Any
) -> dict[str, Any]:
    return {
        "hook": hook,
        "hookInstance": str(uuid.uuid4()),
        "context": {"userId": "Practitioner/dr-1", "patientId": pid, **context},
        "prefetch": prefetch,
    }


def ln(v: float) -> float:
    return math.log(v)


def fulfil(
    templates: dict[str, str], store: list[dict[str, Any]], pid: str = PID
) -> dict[str, Any]:
    """Prefetch as an EHR computes it: each discovery template run as a FHIR search over `store`.

    Supports what the templates use: `Patient/{{context.patientId}}`, and Observation searches
    by patient, `code` (Observation.code only, as FHIR's `code` parameter), `status`,
    `_sort=-date` and `_count`.
    """
    out: dict[str, Any] = {}
    for key, template in templates.items():
        query = template.replace("{{context.patientId}}", pid)
        if query == f"Patient/{pid}":
            out[key] = next((r for r in store if r["resourceType"] == "Patient"), None)
            continue
        kind, _, params = query.partition("?")
        assert kind == "Observation", template
        out[key] = search(dict(p.split("=", 1) for p in params.split("&")), store)
    return out


def search(args: dict[str, str], store: list[dict[str, Any]]) -> dict[str, Any]:
    """An Observation search as a FHIR server runs it: a searchset Bundle."""
    return searchset(*matching(args, store)[: int(args["_count"])])


def matching(args: dict[str, str], store: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every Observation an Observation search matches, newest first."""
    codes = {tuple(c.split("|", 1)) for c in args["code"].split(",")}
    statuses = set(args["status"].split(",")) if "status" in args else None
    found = [
        r
        for r in store
        if r["resourceType"] == "Observation"
        and r["subject"]["reference"] == f"Patient/{args['patient']}"
        and any((c["system"], c["code"]) in codes for c in r["code"]["coding"])
        and (statuses is None or r["status"] in statuses)
    ]
    assert args.get("_sort") == "-date", args
    found.sort(key=lambda r: str(r["effectiveDateTime"]), reverse=True)
    return found


def diabetes_store(now: datetime, pid: str = PID) -> list[dict[str, Any]]:
    """The README's patient as an EHR holds her: the Patient and one final result per feature."""
    when = now - timedelta(days=10)
    return [patient(pid)] + [
        observation(f"{name}-1", LOINC, code, value, unit, when, pid)
        for name, (code, value, unit) in DIABETES.items()
    ]
