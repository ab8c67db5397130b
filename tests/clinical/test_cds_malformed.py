"""Hook calls whose FHIR is unusual or wrong, as a probe of the running server sent them: a field
of the wrong type is a 400 naming it (each was a 500), a result that cannot be used is skipped
with its reason on the card, and common variants of real data are read (code systems as OIDs,
versioned references, medications as contained resources)."""

from __future__ import annotations

import gzip
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
import pytest
from cds_client import Signer, auth
from fhir_ehr import LOINC, MODELS, PID, diabetes_store, fulfil, hook_call, iso, observation

from service.clinical.extraction import extract
from service.clinical.mapping import load_dir
from service.clinical.services import OrderFilter
from service.clinical.terms import Code
from service.errors import MissingDataError

DIABETES = "/cds-services/diabetes-progression"
ORDER_SELECT = "/cds-services/diabetes-progression-order-select"
MAPPING = load_dir(MODELS / "clinical")[0]["diabetes"]
UCUM_OID = "urn:oid:2.16.840.1.113883.6.8"
RXNORM_OID = "urn:oid:2.16.840.1.113883.6.88"


async def _prefetch(ehr: httpx.AsyncClient, service: str) -> dict[str, Any]:
    r = await ehr.get("/cds-services")
    (found,) = [s for s in r.json()["services"] if s["id"] == service]
    return fulfil(found["prefetch"], diabetes_store(datetime.now(UTC)))


def _first_observation(prefetch: dict[str, Any]) -> dict[str, Any]:
    for value in prefetch.values():
        if isinstance(value, dict) and value.get("resourceType") == "Bundle":
            for e in value.get("entry") or []:
                if e["resource"]["resourceType"] == "Observation":
                    obs: dict[str, Any] = e["resource"]
                    return obs
    raise AssertionError("no Observation prefetched")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda p: p.__setitem__(
                next(k for k, v in p.items() if v and v.get("resourceType") == "Bundle"),
                {"resourceType": "Bundle", "type": "searchset", "entry": 5},
            ),
            ".entry must be a JSON array, got int",
        ),
        (
            lambda p: _first_observation(p).__setitem__("component", 5),
            ".component must be a JSON array, got int",
        ),
    ],
    ids=["bundle-entry", "observation-component"],
)
async def test_a_field_of_the_wrong_type_is_a_400_naming_it(
    ehr: httpx.AsyncClient, es384: Signer, change: Any, message: str
) -> None:
    prefetch = await _prefetch(ehr, "diabetes-progression")
    change(prefetch)
    r = await ehr.post(DIABETES, json=hook_call(prefetch), headers=auth(es384, DIABETES))
    assert r.status_code == 400, r.text
    assert message in r.text


async def test_draft_orders_of_the_wrong_type_are_a_400(
    ehr: httpx.AsyncClient, es384: Signer
) -> None:
    prefetch = await _prefetch(ehr, "diabetes-progression-order-select")
    for drafts, said in (
        ({"resourceType": "Bundle", "entry": 5}, "context.draftOrders.entry must be a JSON array"),
        ([], "context.draftOrders must be a FHIR Bundle"),
    ):
        body = hook_call(
            prefetch, hook="order-select", selections=["MedicationRequest/mr-1"], draftOrders=drafts
        )
        r = await ehr.post(ORDER_SELECT, json=body, headers=auth(es384, ORDER_SELECT))
        assert r.status_code == 400 and said in r.text, r.text


async def test_a_value_too_large_for_a_float_is_not_finite(
    ehr: httpx.AsyncClient, es384: Signer
) -> None:
    prefetch = await _prefetch(ehr, "diabetes-progression")
    obs = _first_observation(prefetch)
    obs["valueQuantity"]["value"] = 10**400
    r = await ehr.post(DIABETES, json=hook_call(prefetch), headers=auth(es384, DIABETES))
    assert r.status_code == 200, r.text
    assert f"Observation/{obs['id']} has no finite value" in r.text


def _glucose(prefetch: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The prefetched glucose Observation and the entry list that holds it."""
    for value in prefetch.values():
        if isinstance(value, dict) and value.get("resourceType") == "Bundle":
            entries = value.get("entry") or []
            for e in entries:
                if e["resource"].get("id") == "glu-1":
                    glu: dict[str, Any] = e["resource"]
                    return glu, entries
    raise AssertionError("no glucose prefetched")


async def _call(ehr: httpx.AsyncClient, signer: Signer, prefetch: dict[str, Any]) -> httpx.Response:
    return await ehr.post(DIABETES, json=hook_call(prefetch), headers=auth(signer, DIABETES))


async def test_a_result_dated_in_the_future_is_skipped_with_its_reason(
    ehr: httpx.AsyncClient, es384: Signer
) -> None:
    """A glucose dated 2099 beat last week's and its 300 mg/dL went into the prediction."""
    prefetch = await _prefetch(ehr, "diabetes-progression")
    glu, entries = _glucose(prefetch)
    later = datetime.now(UTC) + timedelta(days=30)
    future = observation("glu-future", LOINC, "2345-7", 300.0, "mg/dL", later)
    entries.append({"resource": future})
    r = await _call(ehr, es384, prefetch)
    assert r.status_code == 200
    detail = r.json()["cards"][0]["detail"]
    used, unused = detail.split("### Results not used\n")
    assert "Observation/glu-1" in used and "glu-future" not in used
    assert f"Observation/glu-future is dated {iso(later)}, in the future" in unused
    entries.remove(next(e for e in entries if e["resource"] is glu))
    r = await _call(ehr, es384, prefetch)
    assert r.status_code == 200
    assert (
        f"no usable final result was prefetched (Observation/glu-future is dated {iso(later)}, "
        "in the future; discovery asks for it under prefetch key 'glu')"
    ) in r.text


async def test_a_time_that_cannot_be_read_is_said(ehr: httpx.AsyncClient, es384: Signer) -> None:
    prefetch = await _prefetch(ehr, "diabetes-progression")
    glu, _ = _glucose(prefetch)
    glu["effectiveDateTime"] = "2026-11-20T10:00:00 UTC"
    r = await _call(ehr, es384, prefetch)
    assert "Observation/glu-1 has no time that can be read" in r.text, r.text


async def test_code_systems_as_oids_and_versioned_references_are_read(
    ehr: httpx.AsyncClient, es384: Signer
) -> None:
    prefetch = await _prefetch(ehr, "diabetes-progression")
    glu, _ = _glucose(prefetch)
    glu["code"]["coding"][0]["system"] = "urn:oid:2.16.840.1.113883.6.1"  # LOINC's OID
    glu["subject"]["reference"] = f"Patient/{PID}/_history/3"
    other = _first_observation(prefetch)
    other["code"]["coding"][0]["system"] = LOINC + "/"
    r = await _call(ehr, es384, prefetch)
    assert r.status_code == 200 and "Observation/glu-1" in r.text, r.text
    assert f"{other['id']}" in r.text


async def test_a_subject_that_is_not_a_reference_is_a_400(
    ehr: httpx.AsyncClient, es384: Signer
) -> None:
    """A string subject was read as the call's patient, whoever it named."""
    prefetch = await _prefetch(ehr, "diabetes-progression")
    glu, _ = _glucose(prefetch)
    glu["subject"] = "Patient/p2"
    r = await _call(ehr, es384, prefetch)
    assert r.status_code == 400
    assert "Observation/glu-1 whose subject is not a Reference" in r.text


async def test_a_medication_as_a_contained_resource_is_read(
    ehr: httpx.AsyncClient, es384: Signer
) -> None:
    """The common R4 shape, medicationReference to a contained Medication, got no card."""
    prefetch = await _prefetch(ehr, "diabetes-progression-order-select")
    order = {
        "resourceType": "MedicationRequest",
        "id": "mr-1",
        "status": "draft",
        "intent": "order",
        "subject": {"reference": f"Patient/{PID}"},
        "medicationReference": {"reference": "#med1"},
        "contained": [
            {
                "resourceType": "Medication",
                "id": "med1",
                "code": {
                    "coding": [
                        {"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "861007"}
                    ]
                },
            }
        ],
    }
    drafts = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": order}]}
    body = hook_call(
        prefetch, hook="order-select", selections=["MedicationRequest/mr-1"], draftOrders=drafts
    )
    r = await ehr.post(ORDER_SELECT, json=body, headers=auth(es384, ORDER_SELECT))
    assert r.status_code == 200 and len(r.json()["cards"]) == 1, r.text


async def test_the_body_as_windows_tools_and_broken_encoders_write_it(
    ehr: httpx.AsyncClient, es384: Signer
) -> None:
    """A byte-order mark is ignored (RFC 8259); a lone surrogate escape says what it is. Both
    got the parser's bare words on this route."""
    raw = orjson.dumps(hook_call(await _prefetch(ehr, "diabetes-progression")))
    json = {"content-type": "application/json"}
    r = await ehr.post(
        DIABETES, content=b"\xef\xbb\xbf" + raw, headers=auth(es384, DIABETES) | json
    )
    assert r.status_code == 200, r.text
    broken = raw.replace(b'"hookInstance":"', b'"hookInstance":"\\ud800', 1)
    r = await ehr.post(DIABETES, content=broken, headers=auth(es384, DIABETES) | json)
    assert r.status_code == 400
    assert "a lone one is not Unicode: send the text as UTF-8" in r.text


async def test_a_fhir_server_the_issuer_may_not_use_is_said_per_key(
    ehr: httpx.AsyncClient, es384: Signer
) -> None:
    """This issuer has no fhir_servers: a call naming one got a card without a word on why its
    data was not fetched. Each note names its prefetch key (the card showed ten equal lines)."""
    body = hook_call({"patient": (await _prefetch(ehr, "diabetes-progression"))["patient"]})
    body["fhirServer"] = "http://127.0.0.1:9/fhir"
    body["fhirAuthorization"] = {"access_token": "t", "token_type": "Bearer", "scope": "x"}
    r = await ehr.post(DIABETES, json=body, headers=auth(es384, DIABETES))
    assert r.status_code == 200, r.text
    detail = r.json()["cards"][0]["detail"]
    assert (
        "prefetch 'glu': not fetched: no FHIR server is allow-listed for this call's issuer "
        "(fhir_servers in MCSERVE_CDS_ISSUERS), so the prefetch must hold it"
    ) in detail


async def test_a_missing_gender_and_a_value_as_a_string_are_said_plainly(
    ehr: httpx.AsyncClient, es384: Signer
) -> None:
    """They read "gender None cannot be mapped" and "has no valueQuantity.value"."""
    prefetch = await _prefetch(ehr, "diabetes-progression")
    del prefetch["patient"]["gender"]
    glu, _ = _glucose(prefetch)
    glu["valueQuantity"]["value"] = "87"
    r = await _call(ehr, es384, prefetch)
    detail = r.json()["cards"][0]["detail"]
    assert f"Patient/{PID} has no gender (needs one of" in detail
    assert "Observation/glu-1 has no valueQuantity.value (it is a string: send a JSON number)" in (
        detail
    )


async def test_an_oid_coded_result_still_has_its_unit_checked(
    ehr: httpx.AsyncClient, es384: Signer
) -> None:
    """The kind check compared raw systems: glucose by mass coded with LOINC's OID and sent in
    mmol/L was accepted as 99 mg/dL instead of refused."""
    prefetch = await _prefetch(ehr, "diabetes-progression")
    glu, _ = _glucose(prefetch)
    glu["code"]["coding"][0]["system"] = "urn:oid:2.16.840.1.113883.6.1"
    glu["valueQuantity"] = {"value": 5.5, "unit": "mmol/L", "system": UCUM_OID, "code": "mmol/L"}
    r = await _call(ehr, es384, prefetch)
    assert (
        "is coded LOINC 2345-7, a mass concentration, but its unit 'mmol/L' is a substance"
        in (r.json()["cards"][0]["detail"])
    )


def test_a_mapping_may_name_its_systems_by_oid() -> None:
    code = Code(system="urn:oid:2.16.840.1.113883.6.1", code="2345-7")
    assert code.system == LOINC and code.label() == "LOINC 2345-7"
    assert OrderFilter(resource_type="MedicationRequest", system=RXNORM_OID).system == (
        "http://www.nlm.nih.gov/research/umls/rxnorm"
    )


def test_todays_result_east_of_utc_is_not_in_the_future() -> None:
    """Dates and zoneless times are read as UTC: at 07:00 in Sydney (21:00 UTC the day before)
    today's result was skipped as an hour ahead, and last week's used without a word."""
    now = datetime(2025, 6, 1, 21, 0, tzinfo=UTC)
    store = diabetes_store(now)
    glu = next(r for r in store if r.get("id") == "glu-1")
    for when, used in (
        ("2025-06-02", True),  # a date: read as midnight UTC, 3 hours ahead
        ("2025-06-02T06:30:00", True),  # no zone: read as UTC, 9.5 hours ahead
        ("2025-06-02T06:30:00+10:00", True),  # 20:30 UTC: in the past
        ("2025-06-01T23:00:00Z", False),  # a zoned time 2 hours ahead: an error of the data
    ):
        glu["effectiveDateTime"] = when
        prefetch = {"patient": store[0], "glu": {"resourceType": "Bundle", "entry": [
            {"resource": r} for r in store[1:]
        ]}}  # fmt: skip
        try:
            ex = extract(MAPPING, PID, prefetch, now)
            assert used and ex.used["glu"].given is None, when
        except MissingDataError as exc:
            assert not used, when
            assert "is dated 2025-06-01T23:00:00Z, in the future" in str(exc.details)


# Bounds the call's time (under 3 s): run alone (the Makefile's serial phase).
@pytest.mark.serial
async def test_a_resource_type_fhir_does_not_define_is_a_400_naming_it(
    ehr: httpx.AsyncClient, es384: Signer
) -> None:
    """A misspelt "Observaton" was passed over in silence: the card said the result was missing."""
    prefetch = await _prefetch(ehr, "diabetes-progression")
    _first_observation(prefetch)["resourceType"] = "Observaton"
    r = await _call(ehr, es384, prefetch)
    assert r.status_code == 400, r.text
    assert "has resourceType 'Observaton', which is not a FHIR R4B or R5 resource type" in r.text
    assert "(did you mean 'Observation'?)" in r.text and ".entry[" in r.text
    prefetch = await _prefetch(ehr, "diabetes-progression")
    key = next(k for k, v in prefetch.items() if v and v.get("resourceType") == "Patient")
    del prefetch[key]["resourceType"]
    r = await _call(ehr, es384, prefetch)
    assert r.status_code == 400, r.text
    assert f"prefetch.{key} has no resourceType" in r.text
    # A data type's name is not a resource type either.
    prefetch[key]["resourceType"] = "Coding"
    r = await _call(ehr, es384, prefetch)
    assert r.status_code == 400 and "'Coding', a FHIR data type, not a resource type" in r.text
    # An R4-only type (neither R4B nor R5 has it), or any name like no resource type, is let
    # through as before: the reader reads only what it knows.
    for other in ("MedicinalProduct", "SubstanceSpecification", "x" * 10_000):
        prefetch = await _prefetch(ehr, "diabetes-progression")
        prefetch["other"] = {"resourceType": other, "id": "m1"}
        r = await _call(ehr, es384, prefetch)
        assert r.status_code == 200, (other[:20], r.text)
    prefetch["other"] = {"resourceType": " ", "id": "m1"}  # blank is no type either
    r = await _call(ehr, es384, prefetch)
    assert r.status_code == 400 and "prefetch.other has a resourceType of ' '" in r.text
    # The misspelling search (about 1 ms a name) runs for a few names per call: 5,000 unknown
    # names held the event loop for about 6 s.
    names = [f"MedicinalProductZ{k:06d}" for k in range(5000)]
    entries = [{"resource": {"resourceType": name, "id": "m"}} for name in names]
    prefetch["other"] = {"resourceType": "Bundle", "type": "searchset", "entry": entries}
    start = time.monotonic()
    r = await _call(ehr, es384, prefetch)
    assert r.status_code == 200 and time.monotonic() - start < 3.0


async def test_a_key_repeated_in_an_object_is_a_400_naming_it(
    ehr: httpx.AsyncClient, es384: Signer
) -> None:
    """A second `valueQuantity` in a result was read, the first dropped, without a word: which
    copy a parser keeps is up to it (RFC 8259), so the call is refused."""
    raw = orjson.dumps(hook_call(await _prefetch(ehr, "diabetes-progression")))
    assert raw.count(b'"valueQuantity":{') >= 1
    twice = raw.replace(b'"valueQuantity":{', b'"valueQuantity":{"value":1.0},"valueQuantity":{', 1)
    json = {"content-type": "application/json"}
    r = await ehr.post(DIABETES, content=twice, headers=auth(es384, DIABETES) | json)
    assert r.status_code == 400
    diagnostics = r.json()["issue"][0]["diagnostics"]
    assert "the key 'valueQuantity' appears twice in one object" in diagnostics


@pytest.mark.parametrize(
    "coding", [{"system": LOINC, "code": ["2345-7"]}, {"system": {"x": 1}, "code": "2345-7"}]
)
async def test_a_coding_whose_code_or_system_is_not_a_string_matches_nothing(
    ehr: httpx.AsyncClient, es384: Signer, coding: dict[str, Any]
) -> None:
    """A list as a code was a TypeError (unhashable) and a 500; it names no code we map."""
    prefetch = await _prefetch(ehr, "diabetes-progression")
    glu, _ = _glucose(prefetch)
    glu["code"]["coding"] = [coding]
    r = await _call(ehr, es384, prefetch)
    assert r.status_code == 200, r.text
    detail = r.json()["cards"][0]["detail"]
    assert "**No prediction was made**" in detail
    assert "- Glucose (LOINC 2345-7" in detail and "no final result was prefetched" in detail


@pytest.mark.parametrize("corrected_first", [True, False])
async def test_a_correction_at_the_same_time_wins_whatever_the_bundle_order(
    ehr: httpx.AsyncClient, es384: Signer, corrected_first: bool
) -> None:
    """A final result and its correction share their effective time; the Bundle's order chose."""
    prefetch = await _prefetch(ehr, "diabetes-progression")
    glu, entries = _glucose(prefetch)
    fixed = dict(glu, id="glu-fixed", status="corrected")
    fixed["valueQuantity"] = dict(glu["valueQuantity"], value=glu["valueQuantity"]["value"] + 40)
    entries.insert(entries.index(next(e for e in entries if e["resource"] is glu)) + (
        0 if corrected_first else 1), {"resource": fixed})  # fmt: skip
    r = await _call(ehr, es384, prefetch)
    assert r.status_code == 200, r.text
    used = r.json()["cards"][0]["detail"].split("### Results not used\n")[0]
    assert "Observation/glu-fixed" in used and "Observation/glu-1" not in used
    # A later `issued` wins over the status: a final result re-sent after the correction.
    glu["issued"], fixed["issued"] = iso(datetime.now(UTC)), iso(datetime.now(UTC) - timedelta(1))
    used = (await _call(ehr, es384, prefetch)).json()["cards"][0]["detail"]
    assert "Observation/glu-1" in used.split("### Results not used\n")[0]


@pytest.mark.parametrize(
    ("context", "said"),
    [
        ({"pid": f"{PID}\n"}, "context.patientId must be a FHIR id"),
        ({"pid": f"{PID}/x"}, "context.patientId must be a FHIR id"),
        ({"pid": "p 1"}, "context.patientId must be a FHIR id"),
        ({"encounterId": "e1\x00"}, "context.encounterId must be a FHIR id"),
        ({"encounterId": "Encounter/e1"}, "context.encounterId must be a FHIR id"),
    ],
)
async def test_context_ids_written_into_references_must_be_fhir_ids(
    ehr: httpx.AsyncClient, es384: Signer, context: dict[str, str], said: str
) -> None:
    """Each was a 200 whose suggested resource referenced `Patient/p1\\n` or `Encounter/e1\\0`."""
    prefetch = await _prefetch(ehr, "diabetes-progression")
    body = hook_call(prefetch, **context)
    r = await ehr.post(DIABETES, json=body, headers=auth(es384, DIABETES))
    assert r.status_code == 400, r.text
    assert said in r.text


async def test_an_observation_without_an_id_is_not_cited(
    ehr: httpx.AsyncClient, es384: Signer
) -> None:
    """It was cited as `Observation/?` in the card and the resource's derivedFrom."""
    prefetch = await _prefetch(ehr, "diabetes-progression")
    glu, _ = _glucose(prefetch)
    del glu["id"]
    r = await _call(ehr, es384, prefetch)
    assert r.status_code == 200 and "Observation/?" not in r.text, r.text
    assert "an Observation with no valid id (None)" in r.json()["cards"][0]["detail"]


async def test_a_value_outside_the_valid_range_is_unusable_input_naming_its_result(
    ehr: httpx.AsyncClient, es384: Signer
) -> None:
    """A glucose of 8700 mg/dL (a typo) was a bare 400 saying "instance 0, feature 'glu'": terms
    of the native API, no resource named, and no card for the clinician."""
    prefetch = await _prefetch(ehr, "diabetes-progression")
    glu, _ = _glucose(prefetch)
    glu["valueQuantity"]["value"] = 8700
    r = await _call(ehr, es384, prefetch)
    assert r.status_code == 200, r.text
    (card,) = r.json()["cards"]
    assert card["indicator"] == "info" and "suggestions" not in card
    assert (
        "Glucose: Observation/glu-1 (LOINC 2345-7) gives 8700 mg/dL, outside the model's valid "
        "range [20, 1000] mg/dL; check the result and its unit"
    ) in card["detail"]
    assert "a measured value the model can use" in card["detail"]


def test_a_card_value_just_under_1000_has_no_exponent() -> None:
    from service.clinical.cards import fmt

    assert [fmt(v) for v in (999.4, 999.6, 1000.0, 99.96, 12.34)] == [
        "999", "1000", "1000", "100", "12.3"
    ]  # fmt: skip


@pytest.mark.parametrize(
    "written", ["20261127", "2026-W48-1", "2026-11-27 10:00:00Z", "2026-331", "٢٠٢٦-١١"]
)
async def test_a_time_fhir_does_not_allow_is_not_read(
    ehr: httpx.AsyncClient, es384: Signer, written: str
) -> None:
    """Python's fromisoformat reads ISO 8601 forms FHIR does not allow: they were used."""
    prefetch = await _prefetch(ehr, "diabetes-progression")
    glu, _ = _glucose(prefetch)
    glu["effectiveDateTime"] = written
    r = await _call(ehr, es384, prefetch)
    assert "Observation/glu-1 has no time that can be read" in r.text, r.text


def test_an_outcome_whose_details_is_a_string_is_quoted() -> None:
    from service.clinical.answers import diagnostics

    outcome = {"resourceType": "OperationOutcome", "issue": [{"code": "x", "details": "gone"}]}
    assert diagnostics(outcome) == "x"  # was an AttributeError: "fetching it failed"


@pytest.mark.parametrize("born", ["19650315", "1965-W11-1", "1965-03-15junk", "١٩٦٥-٠٣-١٥"])
async def test_a_birth_date_fhir_does_not_allow_is_not_read(
    ehr: httpx.AsyncClient, es384: Signer, born: str
) -> None:
    """fromisoformat (and the first ten characters) read these as 1965-03-15: an age of 61."""
    prefetch = await _prefetch(ehr, "diabetes-progression")
    prefetch["patient"]["birthDate"] = born
    r = await _call(ehr, es384, prefetch)
    assert r.status_code == 200 and "has no usable birthDate" in r.text, r.text


def test_outcomes_of_other_shapes_are_quoted_by_their_first_words() -> None:
    from service.clinical.answers import diagnostics

    def said(issue: Any) -> str:
        return diagnostics({"resourceType": "OperationOutcome", "issue": issue})

    assert said(5) == ""  # was a TypeError: the card said only "fetching it failed"
    assert said([{"diagnostics": ["x"], "details": {"text": "token expired"}}]) == "token expired"


@pytest.mark.parametrize(
    "media", ["application/xml", "text/plain", "application/x-www-form-urlencoded"]
)
async def test_a_call_labelled_other_than_json_is_a_415(
    ehr: httpx.AsyncClient, es384: Signer, media: str
) -> None:
    """A hook call (and feedback) labelled application/xml or a form was answered as JSON."""
    body = orjson.dumps(hook_call(await _prefetch(ehr, "diabetes-progression")))
    headers = {**auth(es384, DIABETES), "Content-Type": media}
    r = await ehr.post(DIABETES, content=body, headers=headers)
    assert r.status_code == 415, r.text
    assert f"Content-Type '{media}' is not read here" in r.text
    assert r.json()["resourceType"] == "OperationOutcome"
    assert r.json()["issue"][0]["code"] == "not-supported"
    path = DIABETES + "/feedback"
    fb = {
        "feedback": [
            {"card": "x", "outcome": "accepted", "outcomeTimestamp": "2025-06-01T12:00:00Z"}
        ]
    }
    r = await ehr.post(
        path, content=orjson.dumps(fb), headers={**auth(es384, path), "Content-Type": media}
    )
    assert r.status_code == 415, r.text
    for fine in (
        "application/json; charset=utf-8",
        "application/fhir+json",
        "application/json+fhir",
    ):
        ok = {**auth(es384, DIABETES), "Content-Type": fine}  # DSTU2's type too, as EHRs send it
        assert (await ehr.post(DIABETES, content=body, headers=ok)).status_code == 200, fine


async def test_a_call_past_the_body_budget_is_a_503_operation_outcome(
    cds_app: Any, ehr: httpx.AsyncClient, es384: Signer
) -> None:
    """Other calls in flight (stood in for by bytes taken from the budget) hold all but a
    little of `max_inflight_body_bytes`: a FHIR OperationOutcome with Retry-After, as for
    overload (api/common/inflight.py), and the budget is whole again after."""
    prefetch = await _prefetch(ehr, "diabetes-progression")
    budget = cds_app.state.body_budget
    taken = budget.limit - 100
    budget.take(taken)
    try:
        r = await _call(ehr, es384, prefetch)
    finally:
        budget.give(taken)
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"] == "1"
    assert r.headers["content-type"] == "application/fhir+json"
    (issue,) = r.json()["issue"]
    assert issue["diagnostics"].startswith("the server holds ")
    assert "setting max_inflight_body_bytes" in issue["diagnostics"]
    assert budget.held == 0
    assert (await _call(ehr, es384, prefetch)).status_code == 200


async def test_a_call_without_a_token_holds_no_body_bytes(
    cds_app: Any, ehr: httpx.AsyncClient
) -> None:
    """Its gzip body was inflated before the service checked the token: a caller without one
    could hold the budget of body bytes in flight (review K, D1). Now 401, nothing taken."""
    budget = cds_app.state.body_budget
    taken = budget.limit - 100
    budget.take(taken)
    try:
        r = await ehr.post(
            DIABETES,
            content=gzip.compress(b" " * 20_000),
            headers={"content-type": "application/json", "content-encoding": "gzip"},
        )
    finally:
        budget.give(taken)
    assert r.status_code == 401, r.text
    assert budget.held == 0


async def test_a_call_without_a_token_is_a_401_whatever_its_coding(ehr: httpx.AsyncClient) -> None:
    """An unknown Content-Encoding was answered 415 before the token was checked: a caller
    without one learnt how the server reads bodies (review M)."""
    r = await ehr.post(
        DIABETES,
        content=b"{}",
        headers={"content-type": "application/json", "content-encoding": "br"},
    )
    assert r.status_code == 401, r.text
