"""Playing the EHR against the bundled models: discovery, hook calls, FHIR, feedback, errors."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from cds_client import BASE, ISS, Signer, auth
from fastapi import FastAPI
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.operationoutcome import OperationOutcome
from fhir.resources.R4B.riskassessment import RiskAssessment
from fhir_ehr import (
    LOINC,
    PID,
    breast_prefetch,
    breast_rows,
    diabetes_prefetch,
    hook_call,
    observation,
    patient,
    searchset,
)

from service.clinical.validation import empties, invariants

DIABETES = "/cds-services/diabetes-progression"
BREAST = "/cds-services/breast-mass-malignancy"


def now() -> datetime:
    return datetime.now(UTC)


async def call(
    ehr: httpx.AsyncClient, signer: Signer, path: str, body: dict[str, Any]
) -> httpx.Response:
    return await ehr.post(path, json=body, headers=auth(signer, path))


def only_card(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 200, r.text
    cards = r.json()["cards"]
    assert len(cards) == 1
    assert empties(r.json()) == []
    return cards[0]


def created(card: dict[str, Any]) -> dict[str, Any]:
    (suggestion,) = card["suggestions"]
    (action,) = suggestion["actions"]
    assert action["type"] == "create"
    return action["resource"]


def outcome(r: httpx.Response) -> dict[str, Any]:
    assert r.headers["content-type"].startswith("application/fhir+json")
    body = r.json()
    OperationOutcome.model_validate(body)
    return body


async def test_discovery(ehr: httpx.AsyncClient) -> None:
    r = await ehr.get("/cds-services")  # open: no patient data, no token needed
    assert r.status_code == 200
    services = {s["id"]: s for s in r.json()["services"]}
    assert set(services) == {
        "diabetes-progression",
        "diabetes-progression-order-select",
        "diabetes-progression-order-sign",
        "breast-mass-malignancy",
    }
    assert empties(r.json()) == []
    diab = services["diabetes-progression"]
    assert diab["hook"] == "patient-view" and "version" not in diab
    assert diab["extension"]["example.mcserve.model"] == {"model": "diabetes", "version": "2"}
    assert diab["prefetch"]["patient"] == "Patient/{{context.patientId}}"
    assert diab["prefetch"]["hdl"] == (
        "Observation?patient={{context.patientId}}&code=http://loinc.org|2085-9,"
        "http://loinc.org|14646-4&status=final,amended,corrected&_sort=-date&_count=3"
    )
    assert services["diabetes-progression-order-select"]["hook"] == "order-select"
    cyto = services["breast-mass-malignancy"]["prefetch"]
    assert set(cyto) == {"cytology"} and cyto["cytology"].endswith("&_count=32")


async def test_diabetes_patient_view(ehr: httpx.AsyncClient, es384: Signer) -> None:
    t = now()
    prefetch = diabetes_prefetch(t, hdl=(38 / 38.67, "mmol/L", "14646-4"))  # one in SI units
    card = only_card(await call(ehr, es384, DIABETES, hook_call(prefetch)))
    assert len(card["summary"]) < 140
    assert card["summary"].startswith("Diabetes progression score in 1 year: ")
    assert "95 % interval" in card["summary"]
    assert card["indicator"] in ("info", "warning")
    assert card["source"]["label"].startswith("mcserve: diabetes ")
    detail = card["detail"]
    for text in (
        "Observation/hdl-1 (LOINC 14646-4)",
        "sent as 0.9827 mmol/L",
        "derived: tc / hdl",
        "derived: ln(tg)",
        "Patient/p1 (gender)",
        "which is which",
        "Intended use",
        "not for clinical use",
        "passes, seed",
        "Calibration",
    ):
        assert text in detail, text
    res = created(card)
    Observation.model_validate(res)
    assert invariants(res) == []
    assert res["status"] == ("preliminary" if card["indicator"] == "warning" else "final")
    assert res["subject"] == {"reference": "Patient/p1"}
    q = res["valueQuantity"]
    assert q["code"] == "{score}" and 25 < q["value"] < 400
    assert q["extension"][0]["url"].endswith("iso21090-uncertainty")
    assert q["extension"][0]["valueDecimal"] > 0
    (component,) = res["component"]
    low, high = component["valueRange"]["low"]["value"], component["valueRange"]["high"]["value"]
    assert low < q["value"] < high
    assert {"reference": "Observation/tg-1"} in res["derivedFrom"]
    device = res["contained"][0]
    assert res["device"]["reference"] == "#" + device["id"]
    meta = (await ehr.get("/v1/models/diabetes")).json()
    versions = {v["value"] for v in device["version"]}
    assert {meta["version"], meta["digest"]} <= versions
    assert meta["digest"] in detail


async def test_a_deceased_patient_sent_to_a_service_that_reads_no_age_gets_no_prediction(
    ehr: httpx.AsyncClient, rs384: Signer
) -> None:
    """The check ran only where the mapping reads age or sex: an aspirate's malignancy was
    predicted for a patient the EHR's own Patient said had died."""
    prefetch = breast_prefetch(breast_rows()[0], now())
    prefetch["patient"] = patient(PID) | {"deceasedDateTime": "2020-01-01"}
    card = only_card(await call(ehr, rs384, BREAST, hook_call(prefetch)))
    assert "suggestions" not in card and "no prediction" in card["summary"]
    assert f"Patient/{PID} is recorded as deceased on 2020-01-01" in card["detail"]
    prefetch["patient"] = patient(PID)  # alive: answered as before
    assert "suggestions" in only_card(await call(ehr, rs384, BREAST, hook_call(prefetch)))


async def test_breast_cancer_reports_p_malignant(ehr: httpx.AsyncClient, rs384: Signer) -> None:
    malignant, benign = breast_rows()
    assert malignant["target"] == 0 and benign["target"] == 1  # 0 = malignant (sklearn)
    ranges = []
    for row in (malignant, benign):
        card = only_card(await call(ehr, rs384, BREAST, hook_call(breast_prefetch(row, now()))))
        assert card["summary"].startswith("Probability of malignancy (breast FNA): ")
        res = created(card)
        RiskAssessment.model_validate(res)
        assert invariants(res) == []
        (pred,) = res["prediction"]
        assert pred["outcome"]["coding"][0]["code"] == "254837009"
        assert "probabilityDecimal" not in pred
        rng = pred["probabilityRange"]
        assert rng["low"]["code"] == rng["high"]["code"] == "%"
        assert "mean p(malignant)" in pred["rationale"]
        assert res["performer"]["reference"] == "#model"
        assert len(res["basis"]) == 30
        ranges.append((rng["low"]["value"], rng["high"]["value"]))
    assert ranges[0][0] > 50  # the malignant row: p(malignant) high
    assert ranges[1][1] < 50  # the benign row: p(malignant) low


async def test_feedback(ehr: httpx.AsyncClient, es384: Signer) -> None:
    card = only_card(await call(ehr, es384, DIABETES, hook_call(diabetes_prefetch(now()))))
    path = DIABETES + "/feedback"
    stamp = now().isoformat()
    accepted = {
        "feedback": [
            {
                "card": card["uuid"],
                "outcome": "accepted",
                "acceptedSuggestions": [{"id": card["suggestions"][0]["uuid"]}],
                "outcomeTimestamp": stamp,
            }
        ]
    }
    r = await ehr.post(path, json=accepted, headers=auth(es384, path))
    assert r.status_code == 200 and r.content == b""
    reason = card["overrideReasons"][0]
    overridden = {
        "feedback": [
            {
                "card": card["uuid"],
                "outcome": "overridden",
                "overrideReason": {"reason": reason, "userComment": "recent weight loss"},
                "outcomeTimestamp": stamp,
            }
        ]
    }
    # aud may also be the service's URL (clients differ on the feedback endpoint's aud).
    r = await ehr.post(path, json=overridden, headers=auth(es384, DIABETES))
    assert r.status_code == 200
    metrics = (await ehr.get("/metrics")).text
    assert 'mcserve_cds_feedback_total{outcome="overridden",service="diabetes-progression"}' in (
        metrics
    )
    unknown = {"feedback": [{**accepted["feedback"][0], "card": "no-such-card"}]}
    r = await ehr.post(path, json=unknown, headers=auth(es384, path))
    assert r.status_code == 404
    assert "no-such-card" in outcome(r)["issue"][0]["diagnostics"]
    # A card of one service is unknown to another.
    other = "/cds-services/breast-mass-malignancy/feedback"
    r = await ehr.post(other, json=accepted, headers=auth(es384, other))
    assert r.status_code == 404
    bad = {"feedback": [{**accepted["feedback"][0], "acceptedSuggestions": [{"id": "nope"}]}]}
    r = await ehr.post(path, json=bad, headers=auth(es384, path))
    assert r.status_code == 400


async def test_feedback_is_checked_as_the_specification_says(
    ehr: httpx.AsyncClient, es384: Signer
) -> None:
    card = only_card(await call(ehr, es384, DIABETES, hook_call(diabetes_prefetch(now()))))
    path = DIABETES + "/feedback"
    good = {
        "card": card["uuid"],
        "outcome": "accepted",
        "acceptedSuggestions": [{"id": card["suggestions"][0]["uuid"]}],
        "outcomeTimestamp": "2025-06-01T12:00:00Z",
    }
    cases = [
        ({"outcomeTimestamp": "yesterday"}, "FHIR instant"),
        ({"outcomeTimestamp": "2025-06-01"}, "FHIR instant"),  # a date, not an instant
        ({"outcomeTimestamp": "2025-06-01T12:00:00"}, "time zone"),
        ({"acceptedSuggestions": None}, "acceptedSuggestions"),
    ]
    for change, said in cases:
        body = {"feedback": [{**good, **change}]}
        r = await ehr.post(path, json=body, headers=auth(es384, path))
        assert r.status_code == 400, change
        diagnostics = [i["diagnostics"] for i in outcome(r)["issue"]]
        assert said in diagnostics[0], diagnostics
        assert len(diagnostics) == len(set(diagnostics)) == 1  # each problem said once
    r = await ehr.post(path, json={"feedback": [good]}, headers=auth(es384, path))
    assert r.status_code == 200


async def test_feedback_on_an_information_card_and_reasons_not_offered(
    ehr: httpx.AsyncClient, es384: Signer
) -> None:
    """The missing-data card has a uuid but was never remembered: its feedback was a 404. And a
    reason the card never offered was recorded and audited."""
    path = DIABETES + "/feedback"
    info = only_card(
        await call(ehr, es384, DIABETES, hook_call(diabetes_prefetch(now(), hdl=None)))
    )
    assert info["indicator"] == "info" and "overrideReasons" not in info
    item = {"card": info["uuid"], "outcome": "overridden", "outcomeTimestamp": now().isoformat()}
    r = await ehr.post(path, json={"feedback": [item]}, headers=auth(es384, path))
    assert r.status_code == 200, r.text
    reason = {"system": "http://example.org/reasons", "code": "made-up"}
    body = {"feedback": [item | {"overrideReason": {"reason": reason}}]}
    r = await ehr.post(path, json=body, headers=auth(es384, path))
    assert r.status_code == 400
    assert "it offered none (use userComment)" in outcome(r)["issue"][0]["diagnostics"]
    card = only_card(await call(ehr, es384, DIABETES, hook_call(diabetes_prefetch(now()))))
    body = {"feedback": [item | {"card": card["uuid"], "overrideReason": {"reason": reason}}]}
    r = await ehr.post(path, json=body, headers=auth(es384, path))
    assert r.status_code == 400
    said = outcome(r)["issue"][0]["diagnostics"]
    assert "(http://example.org/reasons made-up) is not one card" in said
    assert all(o["code"] in said for o in card["overrideReasons"])
    offered = {"reason": card["overrideReasons"][1]}
    body = {"feedback": [item | {"card": card["uuid"], "overrideReason": offered}]}
    assert (await ehr.post(path, json=body, headers=auth(es384, path))).status_code == 200


async def test_a_bad_request_names_each_problem_once(ehr: httpx.AsyncClient, es384: Signer) -> None:
    body = hook_call(diabetes_prefetch(now()))
    del body["hookInstance"]
    body["context"] = "not an object"
    r = await call(ehr, es384, DIABETES, body)
    assert r.status_code == 400
    diagnostics = [i["diagnostics"] for i in outcome(r)["issue"]]
    assert diagnostics == [
        "invalid request: hookInstance: Field required",
        "context: Input should be an object",
    ]


async def test_override_reasons_use_this_service_s_code_system(
    ehr: httpx.AsyncClient, es384: Signer
) -> None:
    card = only_card(await call(ehr, es384, DIABETES, hook_call(diabetes_prefetch(now()))))
    systems = {r["system"] for r in card["overrideReasons"]}
    assert systems == {"https://mcserve.example/fhir/CodeSystem/override-reason"}


@pytest.mark.usefixtures("missing_data_412")
async def test_missing_data_is_412_naming_it(ehr: httpx.AsyncClient, es384: Signer) -> None:
    r = await call(ehr, es384, DIABETES, hook_call(diabetes_prefetch(now(), hdl=None)))
    assert r.status_code == 412
    (issue,) = outcome(r)["issue"]
    assert issue["code"] == "required"
    assert issue["details"]["text"] == "HDL cholesterol"
    assert {"system": LOINC, "code": "2085-9"}.items() <= issue["details"]["coding"][0].items()
    # Several problems at once: no patient, too old, unknown unit, no prefetch at all for glucose.
    t = now()
    prefetch = diabetes_prefetch(t, tg=(129.0, "mg"))
    del prefetch["patient"]
    prefetch["bmi"] = searchset(
        observation("bmi-old", LOINC, "39156-5", 30.0, "kg/m2", t - timedelta(days=400))
    )
    prefetch["glu"] = None
    r = await call(ehr, es384, DIABETES, hook_call(prefetch))
    assert r.status_code == 412
    issues = {i["details"]["text"]: i for i in outcome(r)["issue"]}
    assert set(issues) == {"Patient", "Body mass index", "Triglycerides", "Glucose"}
    assert issues["Body mass index"]["code"] == "business-rule"
    assert "400 days old" in issues["Body mass index"]["diagnostics"]
    assert issues["Triglycerides"]["code"] == "code-invalid"
    assert "'mg' cannot be converted to 'mg/dL'" in issues["Triglycerides"]["diagnostics"]


async def test_bad_requests(ehr: httpx.AsyncClient, es384: Signer) -> None:
    body = hook_call(diabetes_prefetch(now()), hook="order-sign")
    r = await call(ehr, es384, DIABETES, body)
    assert r.status_code == 400 and "patient-view" in outcome(r)["issue"][0]["diagnostics"]
    body = hook_call(diabetes_prefetch(now()))
    del body["context"]["patientId"]
    assert (await call(ehr, es384, DIABETES, body)).status_code == 400
    body = hook_call(diabetes_prefetch(now()))
    body["prefetch"]["patient"] = patient("someone-else")
    r = await call(ehr, es384, DIABETES, body)
    assert r.status_code == 400 and "someone-else" in outcome(r)["issue"][0]["diagnostics"]
    r = await ehr.post(DIABETES, content=b"{not json", headers=auth(es384, DIABETES))
    assert r.status_code == 400 and outcome(r)
    r = await call(ehr, es384, "/cds-services/no-such-service", body)
    assert r.status_code == 404 and outcome(r)


async def test_order_select(ehr: httpx.AsyncClient, es384: Signer) -> None:
    path = "/cds-services/diabetes-progression-order-select"

    def order(atc: str) -> dict[str, Any]:
        med = {
            "resourceType": "MedicationRequest",
            "id": "mr-1",
            "status": "draft",
            "intent": "order",
            "subject": {"reference": "Patient/p1"},
            "medicationCodeableConcept": {
                "coding": [{"system": "http://www.whocc.no/atc", "code": atc}]
            },
        }
        return hook_call(
            diabetes_prefetch(now()),
            hook="order-select",
            selections=["MedicationRequest/mr-1"],
            draftOrders={
                "resourceType": "Bundle",
                "type": "collection",
                "entry": [{"resource": med}],
            },
        )

    card = only_card(await call(ehr, es384, path, order("A10BA02")))  # metformin
    Observation.model_validate(created(card))
    r = await call(ehr, es384, path, order("C10AA05"))  # atorvastatin: not a diabetes drug
    assert r.status_code == 200 and r.json() == {"cards": []}


async def test_unauthenticated_calls_get_a_bare_401(ehr: httpx.AsyncClient, es384: Signer) -> None:
    body = hook_call(diabetes_prefetch(now()))
    cases = [
        {},
        {"Authorization": "Bearer not-a-jwt"},
        {"Authorization": f"Bearer {es384.token(BASE + BREAST)}"},  # another service's aud
        {"Authorization": f"Bearer {es384.token('http://test' + DIABETES)}"},  # not the public URL
        {"X-API-Key": "whatever"},
    ]
    for headers in cases:
        r = await ehr.post(DIABETES, json=body, headers=headers)
        assert r.status_code == 401, headers
        assert r.content == b"" and "www-authenticate" not in r.headers
    # The body is not even parsed before the token is checked.
    r = await ehr.post(DIABETES, content=b"{not json")
    assert r.status_code == 401 and r.content == b""
    r = await ehr.post(DIABETES + "/feedback", json={"feedback": []})
    assert r.status_code == 401
    # A replayed token is refused the second time.
    headers = auth(es384, DIABETES)
    assert (await ehr.post(DIABETES, json=body, headers=headers)).status_code == 200
    assert (await ehr.post(DIABETES, json=body, headers=headers)).status_code == 401


async def test_tokens_are_never_logged(
    ehr: httpx.AsyncClient, es384: Signer, caplog: pytest.LogCaptureFixture
) -> None:
    body = hook_call(diabetes_prefetch(now()))
    body["fhirServer"] = "https://ehr.example.org/fhir"
    body["fhirAuthorization"] = {
        "access_token": "SECRET-FHIR-ACCESS-TOKEN",
        "token_type": "Bearer",
        "expires_in": 300,
        "scope": "patient/*.read",
        "subject": "mcserve",
    }
    headers = auth(es384, DIABETES)
    token = headers["Authorization"].removeprefix("Bearer ")
    with caplog.at_level(logging.DEBUG):
        assert (await ehr.post(DIABETES, json=body, headers=headers)).status_code == 200
        assert (await ehr.post(DIABETES, json=body, headers=headers)).status_code == 401  # replay
    logged = " ".join(str(vars(rec)) for rec in caplog.records)
    assert "cds card" in logged and ISS in logged  # the audit line names the issuer
    assert token not in logged and token[:40] not in logged
    assert "SECRET-FHIR-ACCESS-TOKEN" not in logged


async def test_native_api_answers_fhir(ehr: httpx.AsyncClient, cds_app: FastAPI) -> None:
    fhir_json = {"Accept": "application/fhir+json"}
    row = {
        "age": 59,
        "sex": 2,
        "bmi": 32.1,
        "bp": 101,
        "tc": 157,
        "ldl": 93.2,
        "hdl": 38,
        "tch": 4,
        "ltg": 4.8598,
        "glu": 87,
    }
    url = "/v1/models/diabetes:predict"
    r = await ehr.post(url, json={"instances": [row]}, headers=fhir_json)
    assert r.status_code == 422 and "subject" in r.json()["error"]
    r = await ehr.post(url + "?subject=Patient/p1", json={"instances": [row]}, headers=fhir_json)
    assert r.status_code == 200 and r.headers["content-type"] == "application/fhir+json"
    res = r.json()
    Observation.model_validate(res)
    assert invariants(res) == [] and res["subject"] == {"reference": "Patient/p1"}
    r = await ehr.post(
        url + "?subject=Patient/p1", json={"instances": [row, row]}, headers=fhir_json
    )
    bundle = r.json()
    assert bundle["resourceType"] == "Bundle" and len(bundle["entry"]) == 2
    r = await ehr.post(
        url + "?subject=not a reference", json={"instances": [row]}, headers=fhir_json
    )
    assert r.status_code == 422
    malignant, _ = breast_rows()
    features = {k: v for k, v in malignant.items() if k != "target"}
    url = "/v1/models/breast-cancer:predict?subject=Patient/p1"
    for mode in ("mc", "deterministic"):
        body = {"instances": [features], "parameters": {"mode": mode}}
        res = (await ehr.post(url, json=body, headers=fhir_json)).json()
        RiskAssessment.model_validate(res)
        assert invariants(res) == []
        (pred,) = res["prediction"]  # p(malignant) only: the mapping names the outcome
        assert pred["outcome"]["text"] == "Malignant neoplasm of breast"
        if mode == "mc":
            assert pred["probabilityRange"]["low"]["value"] > 50
        else:
            assert 50 < pred["probabilityDecimal"] <= 100
    # Plain JSON is unchanged.
    r = await ehr.post("/v1/models/diabetes:predict", json={"instances": [row]})
    assert "predictions" in r.json()


def test_api_keys_never_guard_cds_routes() -> None:
    from service.api.common.auth import ApiKeyGuard, hash_key
    from service.settings import ApiKey

    guard = ApiKeyGuard(app=None, keys=[ApiKey(id="k", sha256=hash_key("secret"))])  # type: ignore[arg-type]
    for path in ("/cds-services", DIABETES, DIABETES + "/feedback"):
        assert guard.decide(path, {}).status == 0
    assert guard.decide("/v1/models", {}).status == 401


async def test_a_deadline_says_the_server_s_setting_not_a_client_timeout(
    ehr: httpx.AsyncClient, es384: Signer, cds_app: FastAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hook caller cannot send a timeout: the 503 names the server's setting instead."""
    clinical = cds_app.state.cds
    short = clinical.settings.model_copy(update={"cds_timeout_ms": 0.001})
    monkeypatch.setattr(clinical, "settings", short)
    r = await call(ehr, es384, DIABETES, hook_call(diabetes_prefetch(now())))
    assert r.status_code == 503, r.text
    (issue,) = outcome(r)["issue"]
    assert issue["code"] == "transient"
    assert issue["diagnostics"].startswith("the request's deadline passed")
    assert "MCSERVE_CDS_TIMEOUT_MS" in issue["diagnostics"]
    assert "timeout_ms on /v1" not in issue["diagnostics"]


async def test_a_default_over_max_samples_runs_the_maximum(
    ehr: httpx.AsyncClient, es384: Signer, cds_app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hook call cannot send samples: with MCSERVE_MAX_SAMPLES under the model's default,
    every call was refused, telling the EHR to send samples."""
    st = cds_app.state.mcserve
    monkeypatch.setattr(st, "settings", st.settings.model_copy(update={"max_samples": 50}))
    card = only_card(await call(ehr, es384, DIABETES, hook_call(diabetes_prefetch(now()))))
    assert "50 passes" in card["detail"], card["detail"]


async def test_a_hook_calls_deadline_bounds_its_compute_only(
    ehr: httpx.AsyncClient, es384: Signer, cds_app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """cds_timeout_ms bounds the compute: counted from the request's arrival, the token check
    and the FHIR fetches before it spent it (a 0.4 s fetch under a 300 ms deadline was a 503
    "waited in the queue")."""
    import time

    from service.api.cds import routes

    clinical = cds_app.state.cds
    monkeypatch.setattr(
        clinical, "settings", clinical.settings.model_copy(update={"cds_timeout_ms": 300})
    )
    convert = routes.to_array

    def slow(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.4)  # as a slow FHIR fetch before the compute
        return convert(*args, **kwargs)

    monkeypatch.setattr(routes, "to_array", slow)
    card = only_card(await call(ehr, es384, DIABETES, hook_call(diabetes_prefetch(now()))))
    assert card["summary"].startswith("Diabetes progression score in 1 year: ")
