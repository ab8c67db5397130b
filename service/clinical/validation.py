"""Is it a valid FHIR resource: `fhir.resources` and the invariants that library leaves out.

`fhir.resources` checks structure, required fields and choice types; `invariants` checks ras-1 (a
probabilityRange in UCUM `%`), ras-2 (a probabilityDecimal <= 100; here always 0..100, in
percent), never both decimal and range, contained resources referenced (dom-3), no empty values
(CDS Hooks and FHIR allow none), and the iso21090 uncertainty and intervals of an Observation.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from service.clinical.terms import UCUM

Json = dict[str, Any]
FhirVersion = Literal["R4B", "R5"]
UNCERTAINTY = "http://hl7.org/fhir/StructureDefinition/iso21090-uncertainty"
RA_STATUS = {
    "registered",
    "preliminary",
    "final",
    "amended",
    "corrected",
    "cancelled",
    "entered-in-error",
    "unknown",
}


def empties(value: Any, path: str = "$") -> list[str]:
    """Paths of null, "", [] and {} anywhere in `value` (CDS Hooks and FHIR allow none)."""
    if value is None or (isinstance(value, str | list | dict) and len(value) == 0):
        return [path]
    if isinstance(value, float) and not math.isfinite(value):
        return [path]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in empties(v, f"{path}.{k}")]
    if isinstance(value, list):
        return [p for j, v in enumerate(value) for p in empties(v, f"{path}[{j}]")]
    return []


def _percent(q: Any, where: str) -> list[str]:
    if not isinstance(q, dict) or q.get("system") != UCUM or q.get("code") != "%":
        return [f"ras-1: {where} must be a Quantity in UCUM %"]
    v = q.get("value")
    return [] if isinstance(v, int | float) and 0 <= v <= 100 else [f"{where} outside 0..100"]


def invariants(res: Json) -> list[str]:
    """The rules `fhir.resources` does not check (empty when all hold)."""
    out = [f"empty value at {p}" for p in empties(res)]
    ids = {c.get("id") for c in res.get("contained", [])}
    refs = {
        v["reference"][1:]
        for k in ("performer", "device")
        if isinstance(v := res.get(k), dict) and str(v.get("reference", "")).startswith("#")
    }
    if refs - ids:
        out.append(f"references to missing contained resources {sorted(refs - ids)}")
    if ids - refs:
        out.append(f"dom-3: contained resources {sorted(ids - refs)} are not referenced")
    if res.get("resourceType") == "RiskAssessment":
        if res.get("status") not in RA_STATUS:
            out.append(f"status {res.get('status')!r} is not a RiskAssessment status")
        for j, p in enumerate(res.get("prediction", [])):
            where = f"prediction[{j}]"
            has_dec, has_range = "probabilityDecimal" in p, "probabilityRange" in p
            if has_dec and has_range:
                out.append(f"{where}: probabilityDecimal and probabilityRange together")
            if has_dec and not 0 <= p["probabilityDecimal"] <= 100:
                out.append(f"ras-2: {where}.probabilityDecimal must be 0..100 (percent)")
            if has_range:
                r = p["probabilityRange"]
                bad = _percent(r.get("low"), f"{where}.probabilityRange.low")
                bad += _percent(r.get("high"), f"{where}.probabilityRange.high")
                if not bad and r["low"]["value"] > r["high"]["value"]:
                    bad.append(f"{where}.probabilityRange: low above high")
                out += bad
    if res.get("resourceType") == "Observation":
        q = res.get("valueQuantity", {})
        for e in q.get("extension", []):
            if e.get("url") == UNCERTAINTY and not e.get("valueDecimal", -1) >= 0:
                out.append("iso21090-uncertainty must be >= 0")
        for c in res.get("component", []):
            r = c.get("valueRange")
            if r and not r["low"]["value"] <= r["high"]["value"]:
                out.append("component.valueRange: low above high")
    return out


def validate(res: Json, version: FhirVersion) -> None:
    """ValueError unless `res` is a valid resource of `version` and keeps the invariants."""
    if version == "R5":
        from fhir.resources import get_fhir_model_class
    else:
        from fhir.resources.R4B import get_fhir_model_class
    try:
        get_fhir_model_class(res["resourceType"]).model_validate(res)
    except (KeyError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
        raise ValueError(f"invalid FHIR {version} {res.get('resourceType')}: {exc}") from exc
    broken = invariants(res)
    if broken:
        raise ValueError(f"FHIR {res['resourceType']} breaks: {'; '.join(broken)}")
