"""Read a hook's prefetched FHIR data into model features, or say exactly what is missing.

The prefetch is read (completed beforehand, where allowed, from the EHR's FHIR server by
`fetch.py`). Rules (also in docs/CLINICAL.md):
- The Patient is `prefetch.patient` (or any prefetched Patient whose id is `context.patientId`);
  a prefetched Patient or Observation of another patient is a bad request (400).
- Per observation source, the latest usable Observation (or Observation.component) with one
  of its codes wins (`latest.py`); its time is effectiveDateTime, effectiveInstant,
  effectivePeriod (end, else start), else `issued`. Dates without a time are read as midnight
  UTC.
- Units are converted by UCUM (`service/clinical/ucum.py`): any unit commensurable with the
  mapping's (mg/dl, g/L, mg/(100.mL) for mg/dL; [lb_av]/[in_i]2 for kg/m2), molar <-> mass with
  the analyte's molar mass.
- Missing data, a value older than the maximum age, a bound (`comparator`) instead of a value,
  a unit that does not convert, or a value the derivation cannot use: `MissingDataError` with
  one OperationOutcome issue per problem (an info card, or a 412).
- FHIR shapes (times, partial dates, Bundles, references) are read by `records.py`; fallbacks
  and derived features are computed by `derivation.py`.
- Age: whole years at the hook's time (the server's clock when the call arrives: CDS Hooks
  requests carry no time); a partial birthDate is read as the middle of its period.
"""

from __future__ import annotations

import math
from collections.abc import Mapping as AnyMapping
from datetime import datetime
from typing import Any

from service.clinical import ucum
from service.clinical.derivation import Json, derive, fallback, issue, num
from service.clinical.extracted import Extraction, Used
from service.clinical.latest import latest
from service.clinical.mapping import PATIENT_KEY, Mapping, ObservationSource
from service.clinical.records import (
    birth_date,
    codings,
    refers_to,
    resources,
    whole_years,
)
from service.clinical.records import system as canonical_system
from service.clinical.terms import UCUM
from service.errors import InvalidInputError, MissingDataError, shown_name


class Reader:
    def __init__(self, mapping: Mapping, now: datetime, max_age_days: float | None) -> None:
        self.mapping = mapping
        self.now = now
        self.max_age_override = max_age_days
        self.issues: list[Json] = []

    def patient(self, found: list[Json], patient_id: str, ex: Extraction) -> None:
        p = self.mapping.patient
        res = next((r for r in found if r.get("id") == patient_id), None)
        if not (p.age or p.gender) and res is None:
            return  # nothing of the patient is read, and the EHR sent no Patient
        if res is None:
            self.issues.append(
                issue(
                    "required",
                    f"Patient/{patient_id} was not prefetched (prefetch key '{PATIENT_KEY}')",
                    "Patient",
                )
            )
            return
        dead, when = res.get("deceasedBoolean"), res.get("deceasedDateTime")
        if dead is True or (isinstance(when, str) and when):
            # A prediction of what comes next was made for a deceased patient, the age counted
            # to today, with a result to write to the chart (review HI).
            said = f" on {shown_name(when)}" if isinstance(when, str) and when else ""
            self.issues.append(
                issue(
                    "business-rule",
                    f"{ex.patient} is recorded as deceased{said}: no prediction is made",
                    "Patient (deceased)",
                )
            )
            return
        if not (p.age or p.gender):  # the Patient was sent, and is alive: nothing else to read
            return
        if p.age:
            born = birth_date(res.get("birthDate"))
            if born is None or born > self.now.date():
                self.issues.append(
                    issue("required", f"{ex.patient} has no usable birthDate", "Patient.birthDate")
                )
            else:
                years = whole_years(born, self.now.date())
                ex.used[p.age] = Used(
                    p.age, "age", float(years), "years", res["birthDate"], ex.patient, "birthDate"
                )
        if p.gender:
            gender = res.get("gender")
            code = p.gender_codes.get(gender) if isinstance(gender, str) else None
            if code is None:
                known = ", ".join(sorted(p.gender_codes))
                self.issues.append(
                    issue(
                        "required",
                        f"{ex.patient} gender {gender!r} cannot be mapped (needs one of {known})"
                        if gender is not None
                        else f"{ex.patient} has no gender (needs one of {known})",
                        "Patient.gender",
                    )
                )
            else:
                unit = p.gender_coding or "code"
                ex.used[p.gender] = Used(
                    p.gender, "sex", code, unit, None, ex.patient, "gender", f"gender {gender}"
                )

    def observation(self, src: ObservationSource, found: list[Json], ex: Extraction) -> Json | None:
        """Read `src` into `ex.used`, or the issue saying why it could not be."""
        codes = {(c.system, c.code) for c in src.codes}
        what = f"{src.title} ({', '.join(c.label() for c in src.codes)})"
        chosen, skipped = latest(codes, found, self.now)  # latest.py
        if chosen is None:
            # Which key to fill: an EHR's prefetch is set up per key (a pressure under 'bp_panel').
            key = f"discovery asks for it under prefetch key '{src.key}'"
            said = f"no usable final result was prefetched ({'; '.join(skipped)}; {key})"
            return issue(
                "required",
                f"{what}: {said if skipped else f'no final result was prefetched ({key})'}",
                src.title,
                src.codes,
            )
        t, raw, ref, holder = chosen.time, chosen.raw, chosen.ref, chosen.holder
        # A panel under two prefetch keys is found twice: each result said once
        ex.skipped += [
            s for s in dict.fromkeys(f"{what}: {s}" for s in skipped) if s not in ex.skipped
        ]
        limit = self.max_age_override or src.max_age_days or self.mapping.max_age_days
        age_days = (self.now - t).total_seconds() / 86400.0
        if age_days > limit:
            return issue(
                "business-rule",
                f"{what}: the latest result ({ref}, {raw}) is {age_days:.0f} days old; "
                f"the maximum is {limit:g} days",
                src.title,
                src.codes,
            )
        q = holder.get("valueQuantity")
        value = q.get("value") if isinstance(q, dict) else None
        if not isinstance(q, dict) or isinstance(value, bool) or not isinstance(value, int | float):
            return issue(
                "required",
                f"{what}: {ref} has no valueQuantity.value"
                + (" (it is a string: send a JSON number)" if isinstance(value, str) else ""),
                src.title,
                src.codes,
            )
        if q.get("comparator"):
            return issue(
                "value",
                f"{what}: {ref} gives a bound ({q['comparator']}{value}), not a value",
                src.title,
                src.codes,
            )
        system, code, shown = q.get("system"), q.get("code"), q.get("unit")
        unit = code if code is not None else shown if shown is not None else "1"
        try:
            if canonical_system(system) not in (None, UCUM) and code is not None:
                raise ucum.UnitError(f"{unit!r} of system {system} is not a UCUM code")
            if not isinstance(unit, str):
                raise ucum.UnitError(f"{unit!r} is not a unit code")
            factor = src.factor(unit)
        except ucum.UnitError as exc:
            return issue(
                "code-invalid",
                f"{what}: {ref}: {exc}; the value must convert to {src.unit}",
                src.title,
                src.codes,
            )
        if not _finite(value) or not _finite(float(value) * factor):
            return issue("value", f"{what}: {ref} has no finite value", src.title, src.codes)
        sent = codings(holder["code"])
        matched = next((c for c in src.codes if (c.system, c.code) in sent), None)
        label = matched.label() if matched else None
        if matched is not None and matched.kind is not None:
            molar = any(d == ucum.MOL for d, _ in ucum.parse(unit).dims)
            if molar != (matched.kind == "substance"):
                return issue(
                    "code-invalid",
                    f"{what}: {ref} is coded {label}, a {matched.kind} concentration, but its "
                    f"unit {unit!r} is a {'substance' if molar else 'mass'} concentration: the "
                    "code or the unit is wrong",
                    src.title,
                    src.codes,
                )
        converted = float(value) * factor
        given = None if unit == src.unit else f"{num(float(value))} {unit}"
        ex.used[src.name] = Used(src.name, src.title, converted, src.unit, raw, ref, label, given)
        return None

    def observations(self, found: list[Json], ex: Extraction) -> None:
        """Every observation source; where one fails, its fallback (mean arterial pressure from
        systolic and diastolic, BMI from weight and height) before its issue counts."""
        sources = self.mapping.observations
        pending = {}
        for src in sources:
            issue = self.observation(src, found, ex)
            if issue is not None:
                pending[src.name] = issue
        for src in sources:
            if src.name in pending and src.otherwise is not None:
                issue = fallback(self.mapping, src, ex, pending.pop(src.name))
                if issue is not None:
                    pending[src.name] = issue
        self.issues += [pending[s.name] for s in sources if s.name in pending and not s.optional]
        # An optional quantity is shown (and is in the basis) only where a fallback used it.
        used = {a for d in self.mapping.derived for a in d.args}
        for s in sources:
            if s.otherwise is not None and s.name in ex.used and ex.used[s.name].formula:
                used.update(s.otherwise.args)
        for s in sources:
            if s.optional and s.name not in used:
                ex.used.pop(s.name, None)


def extract(
    mapping: Mapping,
    patient_id: str,
    prefetch: AnyMapping[str, Any] | None,
    now: datetime,
    max_age_days: float | None = None,
) -> Extraction:
    """The quantities of `mapping` from the prefetch, or MissingDataError listing every gap."""
    found: list[Json] = []
    for key, res in resources(prefetch):
        kind = res.get("resourceType")
        if kind == "Patient" and res.get("id") != patient_id and key == PATIENT_KEY:
            raise InvalidInputError(
                f"prefetch.{key} is Patient/{res.get('id')}, not context.patientId {patient_id}"
            )
        subject = res.get("subject")
        if kind == "Observation" and not isinstance(subject, dict | None):
            raise InvalidInputError(
                f"prefetch.{key} holds Observation/{res.get('id')} whose subject is not a "
                f'Reference: send {{"reference": "Patient/{patient_id}"}}'
            )
        if kind == "Observation" and not refers_to(subject, patient_id):
            raise InvalidInputError(
                f"prefetch.{key} holds Observation/{res.get('id')} of another patient "
                f"({(subject or {}).get('reference')}), not Patient/{patient_id}"
            )
        found.append(res)
    ex = Extraction(patient=f"Patient/{patient_id}")
    reader = Reader(mapping, now, max_age_days)
    reader.patient([r for r in found if r.get("resourceType") == "Patient"], patient_id, ex)
    reader.observations(found, ex)
    reader.issues += derive(mapping, ex)
    if reader.issues:
        names = "; ".join(i["details"]["text"] for i in reader.issues)
        raise MissingDataError(
            f"needed data is missing, too old or unusable: {names}", reader.issues
        )
    return ex


def _finite(v: float) -> bool:
    """Finite as a float: an integer of 400 digits is not (math.isfinite raised OverflowError)."""
    try:
        return math.isfinite(v)
    except OverflowError:
        return False
