"""/v1 answered as FHIR (Accept: application/fhir+json, ?subject=Patient/123): the record keeps
the native JSON of the same numbers (what a replay recomputes) and says, in
`params.representation`, that the client got them as FHIR and for which subject. Before, the
record held no trace of either."""

from __future__ import annotations

from pathlib import Path

import orjson
from audit_support import serving

from service.audit.replay import replay

BODY = {"instances": [[0.1, -0.2, 0.3, 0.4]], "parameters": {"seed": 1}}


async def test_a_fhir_answer_is_recorded_with_its_form_and_subject(
    repo: Path, tmp_path: Path
) -> None:
    async with serving(repo, audit_path=tmp_path / "a.db") as (app, client):
        fhir = await client.post(
            "/v1/models/clf:predict?subject=Patient/123",
            json=BODY,
            headers={"Accept": "application/fhir+json", "X-Request-ID": "as-fhir"},
        )
        assert fhir.status_code == 200 and fhir.json()["resourceType"] == "RiskAssessment"
        plain = await client.post(
            "/v1/models/clf:predict", json=BODY, headers={"X-Request-ID": "p"}
        )
        assert plain.status_code == 200
        assert await app.state.audit.flush(10)
        [rec] = app.state.audit.store.find("as-fhir")
        [native] = app.state.audit.store.find("p")
    assert rec.params["representation"] == {
        "media_type": "application/fhir+json",
        "fhir_version": "R4B",
        "subject": "Patient/123",
    }
    assert fhir.json()["subject"]["reference"] == "Patient/123"
    assert "representation" not in native.params  # the native JSON: the summary itself
    assert rec.summary == native.summary == plain.text  # the same numbers, natively
    assert orjson.loads(rec.summary)["predictions"][0]["label"] in ("red", "green", "blue")
    assert replay(rec, repo).identical


async def test_in_hmac_mode_the_subject_is_kept_as_its_hmac(repo: Path, tmp_path: Path) -> None:
    """A patient reference in clear beside the referral decision identifies the patient: an
    hmac record keeps its HMAC (a key holder can still find a patient's records)."""
    import hashlib
    import hmac

    key = "k" * 32
    settings = {"audit_path": tmp_path / "h.db", "audit_inputs": "hmac", "audit_hmac_key": key}
    async with serving(repo, **settings) as (app, client):
        r = await client.post(
            "/v1/models/clf:predict?subject=Patient/123",
            json=BODY,
            headers={"Accept": "application/fhir+json", "X-Request-ID": "h"},
        )
        assert r.status_code == 200
        assert await app.state.audit.flush(10)
        [rec] = app.state.audit.store.find("h")
    form = rec.params["representation"]
    assert form["subject"] is None and "Patient/123" not in str(rec.params)
    mac = hmac.new(key.encode(), b"subject\0Patient/123", hashlib.sha256).hexdigest()
    assert form["subject_hmac"] == mac
