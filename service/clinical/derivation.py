"""Quantities computed from others: a source's fallback when its own result is missing (mean
arterial pressure from systolic and diastolic, BMI from weight and height) and the mapping's
derived features (ln, ratio). Each failure is an OperationOutcome issue saying what was lacking
(docs/CLINICAL.md, "The mapping file")."""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

from service.clinical.extracted import Extraction, Used
from service.clinical.mapping import Mapping, ObservationSource
from service.clinical.records import parse_time
from service.clinical.terms import Code

Json = dict[str, Any]


def issue(code: str, diagnostics: str, concept: str, coding: list[Code] | None = None) -> Json:
    details: Json = {"text": concept}
    if coding:
        details["coding"] = [c.coding() for c in coding]
    return {"severity": "error", "code": code, "details": details, "diagnostics": diagnostics}


def num(v: float) -> str:
    return f"{v:.4g}"


# A cuff reading's systolic and diastolic, sent as two Observations, may be stamped seconds apart
ONE_READING = timedelta(minutes=5)


def one_measurement(a: Used, b: Used) -> bool:
    """One Observation, or two taken at one time (compared as instants: 10:00Z is 12:00+02:00)."""
    if a.source == b.source:
        return True
    ta, tb = parse_time(a.date), parse_time(b.date)
    return ta is not None and tb is not None and abs(ta - tb) <= ONE_READING


def bmi(weight: float, height: float) -> float | None:
    """weight / height^2, or None: a height of 1e-170 m squares to 0.0 (ZeroDivisionError)."""
    square = height * height
    return weight / square if height > 0 and square > 0 else None


def fallback(mapping: Mapping, src: ObservationSource, ex: Extraction, own: Json) -> Json | None:
    """`src` from its fallback's arguments, or its own issue (`own`) saying why not either."""
    fb = src.otherwise
    assert fb is not None
    a, b = (ex.used.get(n) for n in fb.args)
    if a is None or b is None:
        lacking = [o for o in mapping.observations if o.name in fb.args]
        lacking = [o for o in lacking if not ex.used.get(o.name)]
        titles = " and ".join(o.title for o in lacking)
        keys = [f"'{k}'" for k in dict.fromkeys(o.key for o in lacking)]
        own["diagnostics"] += (
            f"; nor could it be derived ({fb.formula()}): no usable {titles} "
            f"(prefetch key{'s' if len(keys) > 1 else ''} {', '.join(keys)})"
        )
        return own
    if fb.op == "mean_arterial" and not one_measurement(a, b):
        # One blood pressure is one measurement: a systolic from last month's panel and a
        # diastolic from today's (the newer systolic had no value) are not a pressure.
        own["diagnostics"] += (
            f"; nor could it be derived ({fb.formula()}): {a.title} ({a.source}, {a.date}) "
            f"and {b.title} ({b.source}, {b.date}) are not one measurement"
        )
        return own
    fa, fb_ = mapping.fallback_factors(src)
    x, y = a.value * fa, b.value * fb_
    value = (x + 2 * y) / 3 if fb.op == "mean_arterial" else bmi(x, y)
    if value is None or value == 0 or not math.isfinite(value):
        own["diagnostics"] += f"; nor could it be derived ({fb.formula()}) from these values"
        return own
    ex.used[src.name] = Used(src.name, src.title, value, src.unit, formula=fb.formula())
    return None


def derive(mapping: Mapping, ex: Extraction) -> list[Json]:
    """The mapping's derived features (ln, ratio) into `ex.used`; an issue for each undefined."""
    issues: list[Json] = []
    for d in mapping.derived:
        if any(a not in ex.used for a in d.args):
            continue  # an input is missing: already reported
        args = [ex.used[a].value for a in d.args]
        value = None
        if d.op == "ln" and args[0] > 0:
            value = math.log(args[0])
        elif d.op == "ratio" and args[1] != 0:
            value = args[0] / args[1]
        if value is None or not math.isfinite(value):  # 1e300 / 1e-300 is inf
            shown = ", ".join(f"{a} = {num(ex.used[a].value)}" for a in d.args)
            issues.append(
                issue("value", f"{d.title}: {d.formula()} is undefined for {shown}", d.title)
            )
            continue
        ex.used[d.name] = Used(d.name, d.title, value, d.unit, formula=d.formula())
    return issues
