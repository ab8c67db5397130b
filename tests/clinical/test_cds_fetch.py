"""Fetching what the EHR did not prefetch from its FHIR server (issue 24 item 3).

The FHIR server here is a small one started in the test process on 127.0.0.1 (not HAPI FHIR):
it answers the service's searches with real searchset Bundles from fixture resources, run by
the same search rules as the EHR of the other tests (`fhir_ehr.search`), checks the bearer
token, and has a slow and a huge variant.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest
from cds_client import ISS, Signer, auth
from fastapi import FastAPI
from fhir_ehr import PID, diabetes_store, hook_call, patient, search, searchset

from service.settings import CdsIssuer

DIABETES = "/cds-services/diabetes-progression"
GOOD = "token-of-the-day"


class FhirServer:
    def __init__(self) -> None:
        self.store: list[dict[str, Any]] = []
        self.requests: list[str] = []


@pytest.fixture(scope="module")
def fhir() -> Iterator[tuple[FhirServer, str]]:
    srv = FhirServer()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            srv.requests.append(self.path)
            parts = urlsplit(self.path)
            flavour, _, rest = parts.path.strip("/").partition("/")
            if self.headers.get("Authorization") != f"Bearer {GOOD}":
                outcome = {"resourceType": "OperationOutcome", "issue": [{"code": "login"}]}
                return self.answer(401, outcome)
            if flavour == "slow":
                time.sleep(1.0)
            if rest == f"Patient/{PID}":
                return self.answer(200, patient())
            res = search(dict(parse_qsl(parts.query)), srv.store)
            if flavour == "huge":
                res = searchset(*(res["entry"][0]["resource"] for _ in range(200)))
            self.answer(200, res)

        def answer(self, status: int, res: dict[str, Any]) -> None:
            body = json.dumps(res).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except OSError:
                pass  # the client gave up (the slow server)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield srv, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def allowed(
    cds_app: FastAPI,
    jwks: dict[str, Any],
    fhir: tuple[FhirServer, str],
    monkeypatch: pytest.MonkeyPatch,
) -> FhirServer:
    """The EHR's issuer may be fetched from at the test server's /fhir, /slow and /huge."""
    srv, url = fhir
    clinical = cds_app.state.cds
    issuer = CdsIssuer(jwks=jwks, fhir_servers=[f"{url}/fhir", f"{url}/slow", f"{url}/huge"])
    # A generous deadline (2 shared cores): only the slow server's test shortens it.
    update = {
        "cds_issuers": {ISS: issuer},
        "cds_fhir_timeout_s": 10.0,
        "cds_fhir_max_bytes": 20_000,
    }
    monkeypatch.setattr(clinical, "settings", clinical.settings.model_copy(update=update))
    srv.store = diabetes_store(datetime.now(UTC))
    srv.requests = []
    return srv


def call_with(server: str, token: str = GOOD, scope: str = "patient/*.read") -> dict[str, Any]:
    """A call whose EHR prefetched the Patient only, and gives its FHIR server and a token."""
    body = hook_call({"patient": patient()})
    body["fhirServer"] = server
    body["fhirAuthorization"] = {
        "access_token": token,
        "token_type": "Bearer",
        "expires_in": 300,
        "scope": scope,
        "subject": "cds-service",
        "patient": PID,
    }
    return body


async def post(ehr: httpx.AsyncClient, signer: Signer, body: dict[str, Any]) -> dict[str, Any]:
    r = await ehr.post(DIABETES, json=body, headers=auth(signer, DIABETES))
    assert r.status_code == 200, r.text
    (card,) = r.json()["cards"]
    return card


async def test_missing_data_is_fetched(
    ehr: httpx.AsyncClient, es384: Signer, allowed: FhirServer, fhir: tuple[FhirServer, str]
) -> None:
    card = await post(ehr, es384, call_with(f"{fhir[1]}/fhir"))
    assert "suggestions" in card  # a prediction
    assert "Observation/hdl-1 (LOINC 2085-9)" in card["detail"]
    assert allowed.requests and all(p.startswith("/fhir/Observation?") for p in allowed.requests)
    assert len(allowed.requests) == 10  # every template key but the prefetched Patient


async def test_an_expired_token_gives_a_card_saying_what_is_missing(
    ehr: httpx.AsyncClient, es384: Signer, allowed: FhirServer, fhir: tuple[FhirServer, str]
) -> None:
    card = await post(ehr, es384, call_with(f"{fhir[1]}/fhir", token="expired"))
    assert "suggestions" not in card and "no prediction" in card["summary"]
    assert "HDL cholesterol (LOINC 2085-9, LOINC 14646-4): no final result" in card["detail"]
    assert "fetching it failed: HTTP 401: the access token was refused or expired" in card["detail"]


async def test_a_slow_server_times_out(
    ehr: httpx.AsyncClient,
    es384: Signer,
    allowed: FhirServer,
    fhir: tuple[FhirServer, str],
    cds_app: FastAPI,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clinical = cds_app.state.cds
    short = clinical.settings.model_copy(update={"cds_fhir_timeout_s": 0.5})  # server: 1 s
    monkeypatch.setattr(clinical, "settings", short)
    card = await post(ehr, es384, call_with(f"{fhir[1]}/slow"))
    assert "suggestions" not in card
    assert "fetching it timed out after 0.5 s" in card["detail"]


async def test_a_huge_bundle_is_refused(
    ehr: httpx.AsyncClient, es384: Signer, allowed: FhirServer, fhir: tuple[FhirServer, str]
) -> None:
    card = await post(ehr, es384, call_with(f"{fhir[1]}/huge"))
    assert "suggestions" not in card
    assert "the answer is over 20000 bytes" in card["detail"]


async def test_nothing_is_sent_where_it_is_not_allowed(
    ehr: httpx.AsyncClient, es384: Signer, allowed: FhirServer, fhir: tuple[FhirServer, str]
) -> None:
    elsewhere = await post(ehr, es384, call_with("http://127.0.0.1:9/fhir"))
    assert "not on its issuer's fhir_servers list" in elsewhere["detail"]
    narrow = await post(ehr, es384, call_with(f"{fhir[1]}/fhir", scope="patient/Patient.read"))
    assert "scope does not grant reading Observation" in narrow["detail"]
    assert allowed.requests == []  # the token went nowhere
