"""CDS Hooks with data as hospitals send it (issue 24): each case gets a card.

The EHR is played by `fulfil`: it runs discovery's prefetch templates as FHIR searches over the
records it holds, so what the service asks for is what it gets.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from cds_client import BASE, Signer, auth
from fhir_ehr import LOINC, MODELS, PID, UCUM, diabetes_store, fulfil, hook_call, observation

from service.clinical.extracted import Extraction
from service.clinical.extraction import extract
from service.clinical.mapping import load_dir
from service.clinical.validation import empties, validate

DIABETES = "/cds-services/diabetes-progression"
MAPPING = load_dir(MODELS / "clinical")[0]["diabetes"]
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"


def now() -> datetime:
    return datetime.now(UTC)


async def templates(ehr: httpx.AsyncClient, service: str) -> dict[str, str]:
    r = await ehr.get("/cds-services")
    (found,) = [s for s in r.json()["services"] if s["id"] == service]
    prefetch: dict[str, str] = found["prefetch"]
    return prefetch


async def card_for(
    ehr: httpx.AsyncClient, signer: Signer, store: list[dict[str, Any]]
) -> httpx.Response:
    prefetch = fulfil(await templates(ehr, "diabetes-progression"), store)
    return await ehr.post(DIABETES, json=hook_call(prefetch), headers=auth(signer, DIABETES))


def used(r: httpx.Response) -> str:
    """The card's detail; its suggested resource checked as valid FHIR R4B (the app's version;
    R5 output is validated where the app serves R5, test_cds_cards.py)."""
    assert r.status_code == 200, r.text
    (card,) = r.json()["cards"]
    validate(card["suggestions"][0]["actions"][0]["resource"], "R4B")
    detail: str = card["detail"]
    return detail


async def test_a_newer_preliminary_result_does_not_hide_the_final_one(
    ehr: httpx.AsyncClient, es384: Signer
) -> None:
    t = now()
    store = diabetes_store(t)
    store.append(
        observation(
            "hdl-pre", LOINC, "2085-9", 52.0, "mg/dL", t - timedelta(hours=2), status="preliminary"
        )
    )
    detail = used(await card_for(ehr, es384, store))
    assert "Observation/hdl-1 (LOINC 2085-9)" in detail
    assert "hdl-pre" not in detail


async def test_a_newer_result_without_a_value_does_not_hide_an_older_one(
    ehr: httpx.AsyncClient, es384: Signer
) -> None:
    """A haemolysed specimen: final, no value, a dataAbsentReason (FHIR obs-6). It was the
    result read, and the card said "no valueQuantity.value" and made no prediction; at
    _count=1 the EHR did not even send the older result a prediction could use."""
    t = now()
    store = diabetes_store(t)
    absent = observation("hdl-dar", LOINC, "2085-9", None, None, t - timedelta(days=1))
    del absent["valueQuantity"]
    absent["dataAbsentReason"] = {
        "coding": [{"system": "http://terminology.hl7.org/CodeSystem/data-absent-reason",
                    "code": "error"}],
        "text": "Specimen haemolysed",
    }  # fmt: skip
    store.append(absent)
    detail = used(await card_for(ehr, es384, store))
    assert "Observation/hdl-1 (LOINC 2085-9)" in detail
    assert (
        "Observation/hdl-dar has no value (dataAbsentReason: error, Specimen haemolysed)"
    ) in detail.split("### Results not used")[1]


async def test_a_newer_value_that_is_not_a_number_is_said_not_passed_over(
    ehr: httpx.AsyncClient, es384: Signer
) -> None:
    """A value sent as "61" is the latest result's error: said, not replaced by an older one."""
    t = now()
    store = diabetes_store(t)
    wrong = observation("hdl-str", LOINC, "2085-9", 61.0, "mg/dL", t - timedelta(days=1))
    wrong["valueQuantity"]["value"] = "61"
    store.append(wrong)
    r = await card_for(ehr, es384, store)
    (card,) = r.json()["cards"]
    assert "suggestions" not in card and "HDL cholesterol" in card["summary"]
    assert "Observation/hdl-str has no valueQuantity.value (it is a string" in card["detail"]


def vital(oid: str, code: str, t: datetime, **components: tuple[str, float, str]) -> dict[str, Any]:
    """A US Core vital-signs Observation whose values are in components (e.g. a BP panel)."""
    obs = observation(oid, LOINC, code, None, None, t)
    del obs["valueQuantity"]
    obs["category"] = [{"coding": [{"system": CATEGORY, "code": "vital-signs"}]}]
    obs["component"] = [
        {
            "code": {"coding": [{"system": LOINC, "code": c}]},
            "valueQuantity": {"value": v, "unit": u, "system": UCUM, "code": u},
        }
        for c, v, u in components.values()
    ]
    return obs


def without(store: list[dict[str, Any]], oid: str) -> list[dict[str, Any]]:
    return [r for r in store if r.get("id") != oid]


async def extracted(
    ehr: httpx.AsyncClient, signer: Signer, store: list[dict[str, Any]], t: datetime
) -> tuple[Extraction, str]:
    """What the service reads from the EHR's answer to its templates, and the card's detail."""
    prefetch = fulfil(await templates(ehr, "diabetes-progression"), store)
    r = await ehr.post(DIABETES, json=hook_call(prefetch), headers=auth(signer, DIABETES))
    return extract(MAPPING, PID, prefetch, t), used(r)


async def test_blood_pressure_panel(ehr: httpx.AsyncClient, es384: Signer) -> None:
    t = now()
    store = without(diabetes_store(t), "bp-1")  # no mean arterial pressure result
    panel = vital(
        "bp-panel",
        "85354-9",
        t - timedelta(days=1),
        sys=("8480-6", 130.0, "mm[Hg]"),
        dia=("8462-4", 85.0, "mm[Hg]"),
    )
    ex, detail = await extracted(ehr, es384, [*store, panel], t)
    assert ex.used["bp"].value == pytest.approx((130 + 2 * 85) / 3)  # 100 mm[Hg]
    assert ex.used["sbp"].source == ex.used["dbp"].source == "Observation/bp-panel"
    assert "derived: (sbp + 2 dbp) / 3" in detail
    assert ex.basis().count("Observation/bp-panel") == 1
    # A panel that carries the mean as well: it is read directly.
    panel["component"].append(
        {
            "code": {"coding": [{"system": LOINC, "code": "8478-0"}]},
            "valueQuantity": {"value": 97.0, "unit": "mm[Hg]", "system": UCUM, "code": "mm[Hg]"},
        }
    )
    ex, _ = await extracted(ehr, es384, [*store, panel], t)
    assert ex.used["bp"].value == 97.0 and ex.used["bp"].formula is None
    assert "sbp" not in ex.used  # unused: neither shown nor in the basis


async def test_a_pressure_is_not_made_of_two_measurements(
    ehr: httpx.AsyncClient, es384: Signer
) -> None:
    """Today's panel has no systolic value (a dataAbsentReason): last month's systolic was put
    with today's diastolic into one mean arterial pressure. Not one measurement: no prediction,
    and the unused result is listed once (the panel comes under two prefetch keys)."""
    t = now()
    store = without(diabetes_store(t), "bp-1")
    old = vital("bp-old", "85354-9", t - timedelta(days=30),
                sys=("8480-6", 180.0, "mm[Hg]"), dia=("8462-4", 100.0, "mm[Hg]"))  # fmt: skip
    new = vital("bp-new", "85354-9", t - timedelta(days=1),
                sys=("8480-6", 0.0, "mm[Hg]"), dia=("8462-4", 60.0, "mm[Hg]"))  # fmt: skip
    systolic = new["component"][0]
    del systolic["valueQuantity"]
    systolic["dataAbsentReason"] = {"text": "cuff error"}
    r = await card_for(ehr, es384, [*store, old, new])
    (card,) = r.json()["cards"]
    assert "suggestions" not in card, card["detail"]
    assert "(Observation/bp-old" in card["detail"] and "are not one measurement" in card["detail"]
    # With the mean itself measured, a prediction; the result not used is said once.
    detail = used(await card_for(ehr, es384, [*diabetes_store(t), old, new]))
    said = "Observation/bp-new has no value (dataAbsentReason: cuff error)"
    assert detail.count(said) == 1, detail


async def test_a_pressure_sent_as_two_observations_of_one_time_is_one_measurement(
    ehr: httpx.AsyncClient, es384: Signer
) -> None:
    """Systolic and diastolic as two Observations, their one time written two ways (Z and
    +02:00) and a few seconds apart: one measurement, compared as instants, not strings."""
    t = now()
    store = without(diabetes_store(t), "bp-1")
    sbp = observation("sbp-9", LOINC, "8480-6", 130.0, "mm[Hg]", t)
    dbp = observation("dbp-9", LOINC, "8462-4", 85.0, "mm[Hg]", t)
    at = (t - timedelta(days=1)).replace(microsecond=0)
    sbp["effectiveDateTime"] = at.strftime("%Y-%m-%dT%H:%M:%SZ")
    dbp["effectiveDateTime"] = (at + timedelta(hours=2, seconds=20)).strftime(
        "%Y-%m-%dT%H:%M:%S+02:00"
    )
    ex, _ = await extracted(ehr, es384, [*store, sbp, dbp], t)
    assert ex.used["bp"].value == pytest.approx((130 + 2 * 85) / 3)


async def test_only_a_systolic_value_says_what_is_missing(
    ehr: httpx.AsyncClient, es384: Signer
) -> None:
    t = now()
    store = without(diabetes_store(t), "bp-1")
    store.append(vital("bp-panel", "85354-9", t, sys=("8480-6", 130.0, "mm[Hg]")))
    r = await card_for(ehr, es384, store)
    assert r.status_code == 200  # by default an info card says what is missing (no prediction)
    (card,) = r.json()["cards"]
    assert card["summary"].endswith("no prediction, missing or unusable input: Mean blood pressure")
    assert (
        "nor could it be derived ((sbp + 2 dbp) / 3): no usable Diastolic blood pressure "
        "(prefetch key 'bp_panel')" in (card["detail"])
    )


async def test_missing_data_is_an_info_card(ehr: httpx.AsyncClient, es384: Signer) -> None:
    t = now()
    store = without(without(diabetes_store(t), "hdl-1"), "bmi-1")
    store.append(observation("bmi-old", LOINC, "39156-5", 30.0, "kg/m2", t - timedelta(days=400)))
    r = await card_for(ehr, es384, store)
    assert r.status_code == 200, r.text
    (card,) = r.json()["cards"]
    assert card["indicator"] == "info" and len(card["summary"]) < 140
    assert card["summary"] == (
        "Diabetes progression score in 1 year: no prediction, missing or unusable input: "
        "Body mass index, HDL cholesterol"
    )
    assert "suggestions" not in card and empties(r.json()) == []
    detail = card["detail"]
    assert "**No prediction was made**" in detail
    assert (
        "HDL cholesterol (LOINC 2085-9, LOINC 14646-4): no final result was prefetched "
        "(discovery asks for it under prefetch key 'hdl')"
    ) in detail
    assert "is 400 days old; the maximum is 365 days" in detail
    assert "a final result (or Patient data) sent in the prefetch" in detail
    assert "a result within the allowed age" in detail
    # Feedback on it is recorded like any card's (it has a uuid; it was a 404).
    path = DIABETES + "/feedback"
    fb = {
        "card": card["uuid"],
        "outcome": "overridden",
        "outcomeTimestamp": "2025-06-01T12:00:00Z",
    }
    r = await ehr.post(path, json={"feedback": [fb]}, headers=auth(es384, path))
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("field", "value", "said"),
    [("deceasedDateTime", "2020-01-01", " on 2020-01-01"), ("deceasedBoolean", True, "")],
)
async def test_a_deceased_patient_gets_no_prediction(
    ehr: httpx.AsyncClient, es384: Signer, field: str, value: object, said: str
) -> None:
    """A deceased patient got a prediction of the year to come, the age counted to today."""
    store = diabetes_store(now())
    next(r for r in store if r["resourceType"] == "Patient")[field] = value
    r = await card_for(ehr, es384, store)
    assert r.status_code == 200, r.text
    (card,) = r.json()["cards"]
    assert card["indicator"] == "info" and "suggestions" not in card
    assert "no prediction" in card["summary"], card["summary"]
    assert f"Patient/{PID} is recorded as deceased{said}: no prediction is made" in card["detail"]
    alive = diabetes_store(now())
    next(r for r in alive if r["resourceType"] == "Patient")["deceasedBoolean"] = False
    assert "suggestions" in (await card_for(ehr, es384, alive)).json()["cards"][0]


async def test_bmi_from_weight_and_height(ehr: httpx.AsyncClient, es384: Signer) -> None:
    t = now()
    store = without(diabetes_store(t), "bmi-1")
    store += [
        observation("weight", LOINC, "29463-7", 194.0, "[lb_av]", t - timedelta(days=2)),
        observation("height", LOINC, "8302-2", 165.0, "cm", t - timedelta(days=200)),
    ]
    ex, detail = await extracted(ehr, es384, store, t)
    # 194 lb = 87.9969 kg; 87.9969 / 1.65^2 = 32.322 kg/m2.
    assert ex.used["bmi"].value == pytest.approx(194 * 0.45359237 / 1.65**2)
    assert ex.used["weight"].given == "194 [lb_av]"
    assert ex.used["height"].value == pytest.approx(1.65)
    assert "derived: weight / height^2" in detail


async def test_glucose_in_blood_and_units_as_written(ehr: httpx.AsyncClient, es384: Signer) -> None:
    t = now()
    store = without(without(diabetes_store(t), "glu-1"), "tg-1")
    store += [
        observation("glu-blood", LOINC, "2339-0", 87.0, "mg/dl", t - timedelta(days=3)),
        observation("tg-gl", LOINC, "2571-8", 1.29, "g/L", t - timedelta(days=3)),
    ]
    ex, detail = await extracted(ehr, es384, store, t)
    assert ex.used["glu"].value == 87.0 and ex.used["glu"].code == "LOINC 2339-0"
    assert ex.used["tg"].value == pytest.approx(129.0)
    assert "Observation/glu-blood (LOINC 2339-0)" in detail


async def test_order_select_with_rxnorm(ehr: httpx.AsyncClient, es384: Signer) -> None:
    path = "/cds-services/diabetes-progression-order-select"
    t = now()
    med = {
        "resourceType": "MedicationRequest",
        "id": "mr-1",
        "status": "draft",
        "intent": "order",
        "subject": {"reference": f"Patient/{PID}"},
        "medicationCodeableConcept": {
            "coding": [
                {"system": RXNORM, "code": "861007", "display": "metformin 500 MG Oral Tablet"}
            ]
        },
    }
    prefetch = fulfil(await templates(ehr, "diabetes-progression-order-select"), diabetes_store(t))
    body = hook_call(
        prefetch,
        hook="order-select",
        selections=["MedicationRequest/mr-1"],
        draftOrders={"resourceType": "Bundle", "type": "collection", "entry": [{"resource": med}]},
    )
    r = await ehr.post(path, json=body, headers=auth(es384, path))
    assert r.status_code == 200 and len(r.json()["cards"]) == 1, r.text


def medication_order(system: str, code: str) -> dict[str, Any]:
    return {
        "resourceType": "MedicationRequest",
        "id": "mr-1",
        "status": "draft",
        "intent": "order",
        "subject": {"reference": f"Patient/{PID}"},
        "medicationCodeableConcept": {"coding": [{"system": system, "code": code}]},
    }


async def test_order_sign(ehr: httpx.AsyncClient, es384: Signer) -> None:
    path = "/cds-services/diabetes-progression-order-sign"
    prefetch = fulfil(
        await templates(ehr, "diabetes-progression-order-sign"), diabetes_store(now())
    )

    def body(order: dict[str, Any]) -> dict[str, Any]:
        orders = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": order}]}
        return hook_call(prefetch, hook="order-sign", draftOrders=orders)  # no selections

    r = await ehr.post(
        path, json=body(medication_order(RXNORM, "861007")), headers=auth(es384, path)
    )
    assert r.status_code == 200 and len(r.json()["cards"]) == 1, r.text
    atorvastatin = medication_order("http://www.whocc.no/atc", "C10AA05")
    r = await ehr.post(path, json=body(atorvastatin), headers=auth(es384, path))
    assert r.json() == {"cards": []}
    no_orders = hook_call(prefetch, hook="order-sign")
    r = await ehr.post(path, json=no_orders, headers=auth(es384, path))
    assert r.status_code == 400 and "draftOrders" in r.text


async def test_cards_link_to_the_model(ehr: httpx.AsyncClient, es384: Signer) -> None:
    """To the model's page (docs/PAGES.md), on by default; its JSON metadata with pages off
    (tests/clinical/test_cds_cards.py covers the card builder alone)."""
    t = now()
    metadata = f"{BASE}/models/diabetes/versions/2"
    for store in (diabetes_store(t), without(diabetes_store(t), "hdl-1")):  # a prediction, or not
        r = await card_for(ehr, es384, store)
        (card,) = r.json()["cards"]
        assert card["source"]["url"] == metadata
        (link,) = card["links"]
        assert link == {
            "label": "Model diabetes version 2: metadata, intended use, calibration",  # page
            "url": metadata,
            "type": "absolute",
        }
    assert (await ehr.get(metadata.removeprefix(BASE))).status_code == 200


def test_card_source_is_the_page_or_with_pages_off_the_metadata() -> None:
    from types import SimpleNamespace

    from service.clinical.cards import source

    model: Any = SimpleNamespace(name="diabetes", version="2")
    assert source(model, BASE, page=True)["url"] == f"{BASE}/models/diabetes/versions/2"
    assert source(model, BASE, page=False)["url"] == f"{BASE}/v1/models/diabetes/versions/2"
    assert "url" not in source(model, None, page=True)  # no public URL: no link
