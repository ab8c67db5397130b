"""Reading FHIR records as EHRs send them: times, partial dates, Bundles, references, codes.

No interpretation here (that is `extraction.py`): only what FHIR says the shapes mean.
- dateTime and instant values become aware datetimes; a date without a time is midnight UTC;
  a partial birthDate (YYYY, YYYY-MM) is read as the middle of its period;
- a prefetch value is a resource or a Bundle (its entries unpacked); `null` (the client could
  not prefetch it) and an OperationOutcome (its report of a failure) hold nothing; a missing
  resourceType, a data type's name or a misspelt resource type is a 400 (`check_kind`);
- an Observation's time is effectiveDateTime, effectiveInstant, effectivePeriod (end, else
  start), else `issued`.
"""

from __future__ import annotations

import difflib
import functools
import re
from collections.abc import Iterator
from collections.abc import Mapping as AnyMapping
from datetime import UTC, date, datetime
from typing import Any

from service.errors import InvalidInputError

Json = dict[str, Any]


FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")  # FHIR R4 id: what a reference may name


# FHIR's date, dateTime and instant (YYYY, YYYY-MM, YYYY-MM-DD, then a time): Python's
# fromisoformat also reads ISO 8601 forms FHIR does not allow, such as 20261127 or 2026-W48-1.
_FHIR_TIME = re.compile(
    r"[0-9]{4}(-[0-9]{2}(-[0-9]{2}(T[0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]+)?)?"
    r"(Z|[+-][0-9]{2}:[0-9]{2})?)?)?)?"
)  # ASCII digits: \d took Arabic-Indic ones; seconds optional (FHIR asks for them; EHRs omit)


def parse_time(value: Any) -> datetime | None:
    """A FHIR date, dateTime or instant as an aware datetime (dates: midnight UTC)."""
    if not isinstance(value, str) or not _FHIR_TIME.fullmatch(value):
        return None
    try:
        if len(value) == 4:
            return datetime(int(value), 1, 1, tzinfo=UTC)
        if len(value) == 7:
            return datetime(int(value[:4]), int(value[5:7]), 1, tzinfo=UTC)
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def birth_date(value: Any) -> date | None:
    """A (possibly partial) birthDate; YYYY is read as YYYY-07-01 and YYYY-MM as YYYY-MM-15."""
    # FHIR's date (a dateTime is read by its date): 19650315, 1965-W11-1 or a suffix after the
    # date were read before.
    if not isinstance(value, str) or not _FHIR_TIME.fullmatch(value):
        return None
    try:
        if len(value) == 4:
            return date(int(value), 7, 1)
        if len(value) == 7:
            return date(int(value[:4]), int(value[5:7]), 15)
        return date.fromisoformat(value[:10])
    except ValueError:
        return None


def whole_years(born: date, on: date) -> int:
    return on.year - born.year - ((on.month, on.day) < (born.month, born.day))


def array(value: Any, where: str) -> list[Any]:
    """A JSON array of the call (absent or null: empty); anything else is a 400 naming it, not
    a TypeError further down (an `entry` of 5 was a 500)."""
    if value is None:
        return []
    if not isinstance(value, list):
        kind = "an object" if isinstance(value, dict) else type(value).__name__
        raise InvalidInputError(f"{where} must be a JSON array, got {kind}")
    return value


def resources(prefetch: AnyMapping[str, Any] | None) -> Iterator[tuple[str, Json]]:
    """(prefetch key, resource) for every resource prefetched, Bundles unpacked."""
    fuzzy: set[str] = set()  # unknown names looked up as misspellings in this call
    for key, value in (prefetch or {}).items():
        if value is None:
            continue  # the client could not prefetch it
        if not isinstance(value, dict):
            raise InvalidInputError(f"prefetch.{key} must be a FHIR resource (a JSON object)")
        kind = value.get("resourceType")
        check_kind(kind, f"prefetch.{key}", fuzzy)
        if kind == "Bundle":
            entries = array(value.get("entry"), f"prefetch.{key}.entry")
            for n, entry in enumerate(entries):
                res = entry.get("resource") if isinstance(entry, dict) else None
                if isinstance(res, dict):
                    where = f"prefetch.{key}.entry[{n}].resource"
                    check_kind(res.get("resourceType"), where, fuzzy)
                    yield key, res
        elif kind != "OperationOutcome":  # a client's report that the prefetch failed
            yield key, value


def check_kind(kind: Any, where: str, fuzzy: set[str] | None = None) -> None:
    """A 400 for a resource without a resourceType, with a FHIR data type's name, or with a
    misspelling of a resource type (a misspelt "Observaton" was passed over in silence and the
    card said the result was missing). A name unknown to R4B and R5 and like none of their
    resource types passes, as before: R4-only types (MedicinalProduct) are valid, and the
    reader ignores types it does not read. The misspelling search (about 1 ms a name) runs for
    at most `FUZZY` distinct names of a call (`fuzzy` holds them): a call of thousands of
    unknown names would otherwise hold the event loop for minutes."""
    if not isinstance(kind, str) or not kind.strip():
        said = "has no resourceType" if kind in (None, "") else f"has a resourceType of {kind!r}"
        example = '"resourceType": "Observation"'
        raise InvalidInputError(f"{where} {said}; a FHIR resource names its type, e.g. {example}")
    if len(kind) > 64:  # longer than any FHIR type's name: not looked up, not cached
        return
    known = _kind(kind)
    if known == "resource":
        return
    if known == "datatype":
        raise InvalidInputError(
            f"{where} has resourceType {kind!r}, a FHIR data type, not a resource type"
        )
    if fuzzy is not None:
        if kind in fuzzy or len(fuzzy) >= FUZZY:
            return
        fuzzy.add(kind)
    near = difflib.get_close_matches(kind, _names(), 3, 0.85)
    close = [n for n in near if _kind(n) == "resource"]
    if close:
        raise InvalidInputError(
            f"{where} has resourceType {kind!r}, which is not a FHIR R4B or R5 resource type "
            f"(did you mean {close[0]!r}?)"
        )


FUZZY = 16


@functools.cache
def _names() -> list[str]:
    """Every name fhir.resources defines a model for (resources and data types), listed once."""
    from fhir.resources import fhirtypes

    return [n[:-4] for n in dir(fhirtypes) if n.endswith("Type")]


@functools.lru_cache(maxsize=512)  # bounded: the names come from requests
def _kind(name: str) -> str | None:
    """ "resource" or "datatype" for a name FHIR R4B or R5 defines, else None."""
    from fhir.resources import get_fhir_model_class as r5
    from fhir.resources.R4B import get_fhir_model_class as r4b

    found = None
    for get in (r4b, r5):
        try:
            cls = get(name)
        except (KeyError, ValueError):
            continue
        if any(b.__name__ == "Resource" for b in cls.__mro__):
            return "resource"
        found = "datatype"
    return found


def refers_to(subject: Any, patient_id: str) -> bool:
    if subject is None:
        return True  # no subject to check
    if not isinstance(subject, dict):
        return False  # not a Reference: nothing says whose it is (a string was read as ours)
    ref = subject.get("reference")
    if not isinstance(ref, str):
        return True  # no reference to check (e.g. an identifier only)
    ref = _VERSION.sub("", ref)  # Patient/p1/_history/3 is Patient/p1 (it was "another patient")
    return ref == f"Patient/{patient_id}" or ref.endswith(f"/Patient/{patient_id}")


_VERSION = re.compile(r"/_history/[^/]+$")


def codings(codeable: Any) -> set[tuple[Any, Any]]:
    """A CodeableConcept's (system, code) pairs, systems canonical (`system`): what both the
    match and the unit-kind check read, so neither compares raw systems."""
    found = codeable.get("coding") if isinstance(codeable, dict) else None
    if not isinstance(found, list):
        return set()
    # Only strings: a list or object as a code or system cannot match a mapping, and a set of
    # such pairs was a TypeError (unhashable) and a 500.
    return {
        (system(c.get("system")), c["code"])
        for c in found
        if isinstance(c, dict)
        and isinstance(c.get("code"), str)
        and isinstance(c.get("system"), str | None)
    }


def matches(codeable: Any, codes: set[tuple[str, str]]) -> bool:
    return not codings(codeable).isdisjoint(codes)


# Code systems as HL7 v2 interfaces and older EHRs write them: their OIDs (HL7's terminology
# registry) and a trailing slash, read as the canonical URL the mappings use.
_SYSTEMS = {
    "urn:oid:2.16.840.1.113883.6.1": "http://loinc.org",
    "urn:oid:2.16.840.1.113883.6.96": "http://snomed.info/sct",
    "urn:oid:2.16.840.1.113883.6.88": "http://www.nlm.nih.gov/research/umls/rxnorm",
    "urn:oid:2.16.840.1.113883.6.8": "http://unitsofmeasure.org",
}


def system(value: Any) -> Any:
    """A coding's system in the canonical form the mappings are written in."""
    if not isinstance(value, str):
        return value
    value = value.strip().rstrip("/")
    return _SYSTEMS.get(value, value)


def when(obs: Json) -> tuple[datetime | None, str | None]:
    period = obs.get("effectivePeriod")
    if not isinstance(period, dict):
        period = {}
    for raw in (
        obs.get("effectiveDateTime"),
        obs.get("effectiveInstant"),
        period.get("end"),
        period.get("start"),
        obs.get("issued"),
    ):
        t = parse_time(raw)
        if t is not None:
            return t, raw
    return None, None
