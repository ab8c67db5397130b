"""Which of a patient's results of a concept a prediction uses: the latest usable one.

A result is usable when it is an Observation of a read status (final, amended, corrected) coded
with one of the concept's codes (itself or one of its components), with a valid id (the card and
the suggested resource cite it), a readable time not in the future and a number in
valueQuantity.value: a newer result without one (a dataAbsentReason: haemolysed, not done) hid
an older usable one, and no prediction was made although one could be. (A value that is there
but not a number is the reader's error to report, extraction.py.) Of two at one effective
time (a result and its correction), the later issued wins, then a corrected or amended one over
the final: the Bundle's order decided before, so a correction could be ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from service.clinical.mapping import STATUSES
from service.clinical.records import FHIR_ID, array, matches, parse_time, when
from service.errors import shown_name

Json = dict[str, Any]

# A result dated later than now by more than this is a data error (a wrong clock or time zone,
# a typo), not the latest result: it was used, and a 2099 value beat last week's.
FUTURE = timedelta(hours=1)
# A date, or a time without a zone, is read as UTC (records.parse_time): today's result east of
# UTC can lie up to 14 hours (the widest offset) ahead of the server's clock.
WIDEST_OFFSET = timedelta(hours=14)
_ZONED = re.compile(r"T.*(Z|[+-]\d\d:\d\d)$")
_EARLIEST = datetime.min.replace(tzinfo=UTC)  # no `issued`: before any that has one


def _ahead(raw: str) -> timedelta:
    """How far past now a result's time may lie and still be read."""
    return FUTURE if _ZONED.search(raw) else FUTURE + WIDEST_OFFSET


@dataclass(frozen=True)
class Latest:
    time: datetime
    raw: str  # the time as written
    ref: str  # "Observation/<id>"
    holder: Json  # the Observation, or its component, that holds the value


def latest(
    codes: set[tuple[str, str]], found: list[Json], now: datetime
) -> tuple[Latest | None, list[str]]:
    """The latest usable result coded with one of `codes`, and why others were not used."""
    best: tuple[tuple[datetime, datetime, bool], Latest] | None = None
    skipped: list[str] = []
    for obs in found:
        if obs.get("resourceType") != "Observation" or obs.get("status") not in STATUSES:
            continue
        name = f"Observation/{obs.get('id', '?')}"
        holders = [obs] if matches(obs.get("code"), codes) else []
        holders += [
            c
            for c in array(obs.get("component"), f"{name}.component")
            if isinstance(c, dict) and matches(c.get("code"), codes)
        ]
        if not holders:
            continue
        if not isinstance(obs.get("id"), str) or not FHIR_ID.fullmatch(obs["id"]):
            skipped.append(f"an Observation with no valid id ({shown_name(obs.get('id'))})")
            continue
        t, raw = when(obs)
        if t is None or raw is None:
            skipped.append(
                f"{name} has no time that can be read (effectiveDateTime, "
                "effectiveInstant, effectivePeriod or issued, ISO 8601 with a time zone)"
            )
            continue
        if t > now + _ahead(raw):
            skipped.append(f"{name} is dated {raw}, in the future")
            continue
        absent = _no_value(name, holders[0])
        if absent is not None:
            skipped.append(absent)
            continue
        key = (t, parse_time(obs.get("issued")) or _EARLIEST, obs.get("status") != "final")
        if best is None or key > best[0]:
            best = (key, Latest(t, raw, name, holders[0]))
    return (best[1] if best else None), skipped


def _no_value(name: str, holder: Json) -> str | None:
    """Why `holder` (an Observation or its component) has no value at all, or None. A value that
    is there but not a number ("61", true) is the latest result's error, said by the reader
    (extraction.py), not a reason to read an older result in its place."""
    q = holder.get("valueQuantity")
    value = q.get("value") if isinstance(q, dict) else None
    if value is not None:
        return None
    reason = holder.get("dataAbsentReason")
    if isinstance(reason, dict):  # FHIR obs-6: a reason instead of a value
        coding = array(reason.get("coding"), f"{name}.dataAbsentReason.coding")
        codes = [c.get("code") for c in coding if isinstance(c, dict)]
        said = [shown_name(x) for x in [*codes, reason.get("text")] if isinstance(x, str) and x]
        return f"{name} has no value (dataAbsentReason: {', '.join(said) or 'given'})"
    return f"{name} has no valueQuantity.value"
