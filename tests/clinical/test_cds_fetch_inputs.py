"""What a hook call puts into the requests sent to the EHR's FHIR server: the access token (a
header) and the patient's id (a query) are checked before anything is sent, and neither an
invalid token nor the text of an error raised while sending ever reaches the card."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from cds_client import ISS, Signer, auth
from fastapi import FastAPI
from fhir_ehr import MODELS, PID, diabetes_store, hook_call, patient
from fhir_server import GOOD, FhirServer, serving

from service.clinical.fetch import FetchPolicy, complete
from service.clinical.mapping import load_dir
from service.clinical.search import FhirSearch, Limits, SearchFailed
from service.settings import CdsIssuer

DIABETES = "/cds-services/diabetes-progression"
TEMPLATES = load_dir(MODELS / "clinical")[0]["diabetes"].prefetch()
SECRET = "SECRET-42"
# A newline (httpx quoted the header in its error, token and all), a non-ASCII letter
# (UnicodeEncodeError: a 500), a space, a NUL: none of them a b64token (RFC 6750).
BAD_TOKENS = [f"abc\n{SECRET}", f"t\u00f8ken{SECRET}", f"abc {SECRET}", f"{SECRET}\x00"]


@pytest.fixture(scope="module")
def server() -> Iterator[FhirServer]:
    srv = FhirServer()
    with serving(srv):
        yield srv


def authorization(token: str) -> dict[str, Any]:
    return {"access_token": token, "token_type": "Bearer", "scope": "patient/*.read"}


async def fetch(server: FhirServer, token: str, pid: str = PID) -> list[dict[str, Any]]:
    base = f"{server.url}/fhir"
    server.reset(diabetes_store(datetime.now(UTC), pid=pid))
    _, notes = await complete(
        TEMPLATES, {"patient": patient()}, pid, base, authorization(token), FetchPolicy([base])
    )
    return notes


@pytest.mark.parametrize("token", BAD_TOKENS)
async def test_a_token_a_header_cannot_carry_is_neither_sent_nor_echoed(
    server: FhirServer, token: str
) -> None:
    notes = await fetch(server, token)
    assert server.requests == []
    assert len(notes) == len(TEMPLATES) - 1  # every key but the prefetched Patient
    for n in notes:
        assert "fhirAuthorization.access_token is not a Bearer token (RFC 6750" in n["diagnostics"]
        assert SECRET not in str(n)


async def test_a_valid_token_is_still_sent(server: FhirServer) -> None:
    assert await fetch(server, GOOD) == []
    assert len(server.requests) == len(TEMPLATES) - 1


@pytest.mark.parametrize("pid", ["p1&code=http://loinc.org|2345-7", "p 1", "p1#x", "p/1"])
async def test_a_patient_id_that_is_not_a_fhir_id_is_never_put_into_a_query(
    server: FhirServer, pid: str
) -> None:
    notes = await fetch(server, GOOD, pid)
    assert server.requests == []
    assert notes and all("is not a FHIR id" in n["diagnostics"] for n in notes)


async def test_an_error_while_sending_is_not_quoted() -> None:
    """h11 refuses a header with the header in its message; a card must never show that."""

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.LocalProtocolError(f"Illegal header value b'Bearer {SECRET}'")

    client = httpx.AsyncClient(transport=httpx.MockTransport(refuse))
    with pytest.raises(SearchFailed) as caught:
        await FhirSearch(client, "https://ehr.example/fhir", PID, Limits()).run("Patient/p1")
    assert str(caught.value) == "LocalProtocolError from the FHIR server https://ehr.example/fhir"

    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused")

    client = httpx.AsyncClient(transport=httpx.MockTransport(refused))
    with pytest.raises(SearchFailed, match=r"Connection refused"):  # still said
        await FhirSearch(client, "https://ehr.example/fhir", PID, Limits()).run("Patient/p1")


async def test_the_card_says_why_and_never_shows_the_token(
    ehr: httpx.AsyncClient,
    es384: Signer,
    cds_app: FastAPI,
    jwks: dict[str, Any],
    server: FhirServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clinical = cds_app.state.cds
    issuer = CdsIssuer(jwks=jwks, fhir_servers=[f"{server.url}/fhir"])
    update = {"cds_issuers": {ISS: issuer}, "cds_fhir_timeout_s": 10.0}
    monkeypatch.setattr(clinical, "settings", clinical.settings.model_copy(update=update))
    server.reset([])
    for token in BAD_TOKENS:
        body = hook_call({"patient": patient()})
        body |= {"fhirServer": f"{server.url}/fhir", "fhirAuthorization": authorization(token)}
        r = await ehr.post(DIABETES, json=body, headers=auth(es384, DIABETES))
        assert r.status_code == 200, (token, r.text)
        assert SECRET not in r.text and "RFC 6750" in r.text
    assert server.requests == []
