"""Fetching what the EHR did not prefetch from its FHIR server (issue 24 item 3).

The FHIR server is the one of `fhir_server.py`, started in the test process on 127.0.0.1 (not
HAPI FHIR, which cannot be fetched here: see there): it answers the service's reads and
searches with real searchset Bundles from fixture resources, pages them 10 results at a time
with `next` links, checks the bearer token, and has slow, huge, endless, redirecting, astray
and broken variants. A second server on another port stands for "another host".
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from cds_client import ISS, Signer, auth
from fastapi import FastAPI
from fhir_ehr import (
    LOINC,
    PID,
    breast_prefetch,
    breast_rows,
    diabetes_store,
    hook_call,
    observation,
    patient,
)
from fhir_server import ENDLESS, GOOD, READ_PATIENT_ONLY, FhirServer, outcome, serving

from service.clinical.search import FhirSearch, Limits, SearchFailed
from service.settings import CdsIssuer

DIABETES = "/cds-services/diabetes-progression"
BREAST = "/cds-services/breast-mass-malignancy"
FLAVOURS = (
    "fhir", "slow", "huge", "endless", "redirect", "astray", "broken", "unsorted", "nostatus"
)  # fmt: skip


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[FhirServer, FhirServer]]:
    """The EHR's FHIR server, and another host that must never be reached."""
    srv, other = FhirServer(page_size=10), FhirServer()
    with serving(srv), serving(other):
        srv.elsewhere = other.url
        yield srv, other


@pytest.fixture
def fhir(
    cds_app: FastAPI,
    jwks: dict[str, Any],
    servers: tuple[FhirServer, FhirServer],
    monkeypatch: pytest.MonkeyPatch,
) -> FhirServer:
    """The EHR's issuer may be fetched from at each of the server's base paths (not the other
    host); the store holds the README's diabetes patient and a malignant-looking aspirate."""
    srv, other = servers
    clinical = cds_app.state.cds
    issuer = CdsIssuer(jwks=jwks, fhir_servers=[f"{srv.url}/{f}" for f in FLAVOURS])
    # A generous deadline (2 shared cores): only the slow server's test shortens it.
    update = {
        "cds_issuers": {ISS: issuer},
        "cds_fhir_timeout_s": 10.0,
        "cds_fhir_max_bytes": 20_000,
    }
    monkeypatch.setattr(clinical, "settings", clinical.settings.model_copy(update=update))
    now = datetime.now(UTC)
    cytology = breast_prefetch(breast_rows()[0], now)["cytology"]["entry"]
    srv.reset(diabetes_store(now) + [e["resource"] for e in cytology])
    other.reset([])
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


async def post(
    ehr: httpx.AsyncClient, signer: Signer, body: dict[str, Any], path: str = DIABETES
) -> dict[str, Any]:
    r = await ehr.post(path, json=body, headers=auth(signer, path))
    assert r.status_code == 200, r.text
    (card,) = r.json()["cards"]
    return card


async def test_missing_data_is_fetched(
    ehr: httpx.AsyncClient, es384: Signer, fhir: FhirServer
) -> None:
    card = await post(ehr, es384, call_with(f"{fhir.url}/fhir"))
    assert "suggestions" in card  # a prediction
    assert "Observation/hdl-1 (LOINC 2085-9)" in card["detail"]
    assert fhir.requests and all(p.startswith("/fhir/Observation?") for p in fhir.requests)
    assert len(fhir.requests) == 10  # every template key but the prefetched Patient


async def test_a_search_follows_next_links_across_pages(
    ehr: httpx.AsyncClient, es384: Signer, fhir: FhirServer
) -> None:
    """The aspirate's 30 results, asked with _count=32, come 10 a page: 3 pages make one."""
    body = call_with(f"{fhir.url}/fhir")
    body["prefetch"] = {}
    card = await post(ehr, es384, body, BREAST)
    assert "suggestions" in card, card["detail"]  # all 30 inputs: a prediction
    first, *rest = fhir.requests
    assert first.startswith("/fhir/Observation?") and "_count=32" in first
    assert [p.split("_getpagesoffset=")[1][:2] for p in rest] == ["10", "20"]


async def test_a_server_that_ignores_sort_is_read_to_the_end(
    ehr: httpx.AsyncClient, es384: Signer, fhir: FhirServer
) -> None:
    """With _count=3 and the server's own order (oldest first), an old glucose was the one read.
    Its self link shows it dropped _sort, so it is asked again for every result (one page, not
    one page per result: at _count=1 the 5-page bound failed from 5 results on) and the latest
    is used."""
    for k in range(6):
        when = datetime.now(UTC) - timedelta(days=200 + k)
        fhir.store.append(observation(f"glu-old{k}", LOINC, "2345-7", 300.0, "mg/dL", when))
    card = await post(ehr, es384, call_with(f"{fhir.url}/unsorted"))
    assert "suggestions" in card, card["detail"]
    assert "Observation/glu-1 " in card["detail"] and "glu-old" not in card["detail"]
    searched = [p for p in fhir.requests if "2345-7" in p]
    assert len(searched) == 2 and "_count=3" in searched[0] and "_count=500" in searched[1]
    # A server that sorts is read as asked: the first page's _count results.
    fhir.requests.clear()
    card = await post(ehr, es384, call_with(f"{fhir.url}/fhir"))
    assert "Observation/glu-1 " in card["detail"] and "glu-old" not in card["detail"]
    assert len([p for p in fhir.requests if "2345-7" in p]) == 1


async def test_a_server_that_ignores_status_is_read_to_the_end(
    ehr: httpx.AsyncClient, es384: Signer, fhir: FhirServer
) -> None:
    """Its first _count results were newer preliminary ones, and the final glucose behind them
    was never read: "no final result". Its self link shows it dropped status, so it is asked
    again for every result and the latest final one is used."""
    for k in range(4):
        when = datetime.now(UTC) - timedelta(days=1 + k)
        fhir.store.append(
            observation(f"glu-pre{k}", LOINC, "2345-7", 300.0, "mg/dL", when, status="preliminary")
        )
    card = await post(ehr, es384, call_with(f"{fhir.url}/nostatus"))
    assert "suggestions" in card, card["detail"]
    assert "Observation/glu-1 " in card["detail"] and "glu-pre" not in card["detail"]
    searched = [p for p in fhir.requests if "2345-7" in p]
    assert len(searched) == 2 and "_count=3" in searched[0] and "_count=500" in searched[1]


async def test_more_unsorted_results_than_the_bound_fail_rather_than_guess(
    fhir: FhirServer,
) -> None:
    """Past max_entries the newest cannot be told: a failure (the card says why), not the
    first results in the server's order (they were returned in silence)."""
    for k in range(30):
        when = datetime.now(UTC) - timedelta(days=200 + k)
        fhir.store.append(observation(f"glu-old{k}", LOINC, "2345-7", 300.0, "mg/dL", when))
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {GOOD}"}) as client:
        search = FhirSearch(client, f"{fhir.url}/unsorted", PID, Limits(max_entries=20))
        query = f"patient={PID}&code=http://loinc.org|2345-7&_sort=-date&_count=1"
        with pytest.raises(
            SearchFailed,
            match=r"ignored _sort=-date \(it did not sort by date\) and holds over 20 results",
        ):
            await search.search("Observation", query)
        search = FhirSearch(client, f"{fhir.url}/fhir", PID, Limits(max_entries=20))
        found = await search.search("Observation", query)
    assert [e["resource"]["id"] for e in found["entry"]] == ["glu-1"]


async def test_paging_is_bounded(
    ehr: httpx.AsyncClient,
    es384: Signer,
    fhir: FhirServer,
    cds_app: FastAPI,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clinical = cds_app.state.cds
    two = clinical.settings.model_copy(update={"cds_fhir_max_pages": 2})
    monkeypatch.setattr(clinical, "settings", two)
    body = call_with(f"{fhir.url}/fhir")
    body["prefetch"] = {}
    card = await post(ehr, es384, body, BREAST)
    assert "suggestions" not in card and "no prediction" in card["summary"]
    assert "needs more than 2 pages for 32 results (it gave 20" in card["detail"]
    assert len(fhir.requests) == 2


async def test_an_expired_token_gives_a_card_saying_what_is_missing(
    ehr: httpx.AsyncClient, es384: Signer, fhir: FhirServer
) -> None:
    card = await post(ehr, es384, call_with(f"{fhir.url}/fhir", token="expired"))
    assert "suggestions" not in card and "no prediction" in card["summary"]
    assert "HDL cholesterol (LOINC 2085-9, LOINC 14646-4): no final result" in card["detail"]
    assert (
        "fetching it failed: HTTP 401: the FHIR server refused the access token (expired or "
        "revoked) (the server said: Token expired)"
    ) in card["detail"]
    assert "a current access token in fhirAuthorization" in card["detail"]  # what would help


async def test_a_token_the_server_forbids_gives_a_card(
    ehr: httpx.AsyncClient, es384: Signer, fhir: FhirServer
) -> None:
    card = await post(ehr, es384, call_with(f"{fhir.url}/fhir", token=READ_PATIENT_ONLY))
    assert "suggestions" not in card
    assert "HTTP 403: the access token does not allow this read" in card["detail"]
    assert "(the server said: Access denied by scope)" in card["detail"]


async def test_a_slow_server_times_out(
    ehr: httpx.AsyncClient,
    es384: Signer,
    fhir: FhirServer,
    cds_app: FastAPI,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clinical = cds_app.state.cds
    short = clinical.settings.model_copy(update={"cds_fhir_timeout_s": 0.5})  # server: 1 s
    monkeypatch.setattr(clinical, "settings", short)
    card = await post(ehr, es384, call_with(f"{fhir.url}/slow"))
    assert "suggestions" not in card
    assert "fetching it timed out after 0.5 s" in card["detail"]
    assert "a FHIR server that answers in time" in card["detail"]


async def test_a_bundle_declared_huge_is_not_read(
    ehr: httpx.AsyncClient, es384: Signer, fhir: FhirServer
) -> None:
    card = await post(ehr, es384, call_with(f"{fhir.url}/huge"))
    assert "suggestions" not in card
    assert "the answer is 52428800 bytes, over the limit of 20000" in card["detail"]


async def test_a_huge_bundle_is_cut_off_while_streaming(
    ehr: httpx.AsyncClient, es384: Signer, fhir: FhirServer
) -> None:
    """256 MiB per search offered without a Content-Length: reading stops past the limit and
    the connection closes, so the server writes no more than the socket buffers take."""
    card = await post(ehr, es384, call_with(f"{fhir.url}/endless"))
    assert "suggestions" not in card
    assert "the answer is over 20000 bytes (CDS_FHIR_MAX_BYTES); reading stopped" in card["detail"]
    for _ in range(100):  # each of the server's threads sees the hang-up on its next write
        if len(fhir.streamed) == len(fhir.requests):
            break
        await asyncio.sleep(0.1)
    assert len(fhir.streamed) == len(fhir.requests) == 10
    assert max(fhir.streamed) < ENDLESS // 4, fhir.streamed  # not read to the end


async def test_a_redirect_to_another_host_is_refused(
    ehr: httpx.AsyncClient,
    es384: Signer,
    fhir: FhirServer,
    servers: tuple[FhirServer, FhirServer],
) -> None:
    card = await post(ehr, es384, call_with(f"{fhir.url}/redirect"))
    assert "suggestions" not in card
    host = fhir.elsewhere.removeprefix("http://")
    assert f"HTTP 302 redirect to {host}, another server: not followed" in card["detail"]
    assert servers[1].requests == []  # the token never reached it


async def test_a_next_link_to_another_host_is_refused(
    ehr: httpx.AsyncClient,
    es384: Signer,
    fhir: FhirServer,
    servers: tuple[FhirServer, FhirServer],
) -> None:
    body = call_with(f"{fhir.url}/astray")
    body["prefetch"] = {}
    card = await post(ehr, es384, body, BREAST)
    assert "suggestions" not in card
    host = fhir.elsewhere.removeprefix("http://")
    assert f"page 1's next link leads to {host}, another server: not followed" in card["detail"]
    assert len(fhir.requests) == 1 and servers[1].requests == []


async def test_an_invalid_resource_is_refused(
    ehr: httpx.AsyncClient, es384: Signer, fhir: FhirServer
) -> None:
    card = await post(ehr, es384, call_with(f"{fhir.url}/broken"))
    assert "suggestions" not in card
    assert (
        "Observation/hdl-1 is not valid FHIR (R4B or R5): valueQuantity.value: "
        "Value error, Decimal value string does not match spec regex"
    ) in card["detail"]
    assert "valid FHIR from the FHIR server" in card["detail"]


async def test_nothing_is_sent_where_it_is_not_allowed(
    ehr: httpx.AsyncClient,
    es384: Signer,
    fhir: FhirServer,
    servers: tuple[FhirServer, FhirServer],
) -> None:
    elsewhere = await post(ehr, es384, call_with(f"{servers[1].url}/fhir"))
    assert "not on its issuer's fhir_servers list" in elsewhere["detail"]
    narrow = await post(ehr, es384, call_with(f"{fhir.url}/fhir", scope="patient/Patient.read"))
    assert "scope does not grant searching Observation" in narrow["detail"]
    assert fhir.requests == [] and servers[1].requests == []  # the token went nowhere


@pytest.mark.parametrize(
    ("scope", "read", "search"),
    [
        ("patient/*.read", True, True),
        ("patient/Observation.*", True, True),
        ("patient/*.cruds", True, True),  # SMART v2: every letter, in order (was refused)
        ("patient/Observation.cruds", True, True),
        ("user/Observation.crs", True, True),
        ("patient/Observation.rs?category=laboratory", True, True),  # narrowed by the server
        ("patient/Observation.r", True, False),  # v2 searching needs 's' (was granted)
        ("patient/Observation.s", False, True),
        ("patient/Observation.sr", False, False),  # letters out of order: not a scope
        ("patient/Observation.write", False, False),
        ("patient/Patient.rs", False, False),
        ("launch/patient openid", False, False),
    ],
)
def test_smart_v1_and_v2_scopes(scope: str, read: bool, search: bool) -> None:
    from service.clinical.fetch import _grants

    assert _grants(scope, "Observation", search=False) is read
    assert _grants(scope, "Observation", search=True) is search


@pytest.mark.parametrize(
    ("url", "owned"),
    [
        ("https://ehr.example/fhir?_getpages=a", True),
        ("https://EHR.example:443/fhir/Observation?x=1", True),
        ("https://ehr.example/fhirx/Observation", False),  # another base path
        ("https://ehr.example:8443/fhir/Observation", False),  # another port
        ("http://ehr.example/fhir/Observation", False),  # another scheme
        ("https://elsewhere.example/?https://ehr.example/fhir", False),  # fhirpy lets it by
        ("https://ehr.example.elsewhere.example/fhir", False),
    ],
)
def test_only_the_servers_own_urls_are_followed(url: str, owned: bool) -> None:
    server = FhirSearch(httpx.AsyncClient(), "https://ehr.example/fhir/", PID, Limits())
    assert server.owns(url) is owned


def one(status: int, body: Any, media: str = "application/fhir+json") -> FhirSearch:
    """The search client against a server that answers every request with `body`."""

    def answer(request: httpx.Request) -> httpx.Response:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        return httpx.Response(status, content=raw, headers={"Content-Type": media})

    client = httpx.AsyncClient(transport=httpx.MockTransport(answer))
    return FhirSearch(client, "https://ehr.example/fhir", PID, Limits(max_entries=3))


QUERY = f"Observation?patient={PID}&code=http://loinc.org|2085-9&_count=1"


@pytest.mark.parametrize(
    ("status", "body", "media", "said", "code"),
    [
        (500, outcome("exception", "Database down"), "application/fhir+json",
         "HTTP 500 (the server said: Database down)", "transient"),
        (401, b"<html>Unauthorized</html>", "text/html",
         "HTTP 401: the FHIR server refused the access token (expired or revoked)", "login"),
        (200, b"<html>Sign in</html>", "text/html", "the answer is text/html, not FHIR JSON",
         "structure"),
        (200, outcome("too-costly", "Search too broad"), "application/fhir+json",
         "the server answered an OperationOutcome (the server said: Search too broad)",
         "processing"),
        (200, {"resourceType": "Bundle", "type": "searchset", "entry": "x"},
         "application/json", "a Bundle: entry is not an array of objects", "structure"),
        (200, {"resourceType": "Bundle", "type": "searchset", "entry": [{}] * 4},
         "application/json", "a page holds over 3 entries", "too-costly"),
        (200, {"resourceType": "Bundle", "type": "searchset",
               "entry": [{"resource": patient("someone-else")}]},
         "application/json", "a search for Observation gave Patient/someone-else", "processing"),
    ],
)  # fmt: skip
async def test_what_a_search_refuses(
    status: int, body: Any, media: str, said: str, code: str
) -> None:
    with pytest.raises(SearchFailed) as caught:
        await one(status, body, media).run(QUERY)
    assert str(caught.value) == said and caught.value.code == code


async def test_the_legacy_fhir_json_media_type_is_read() -> None:
    """application/json+fhir (DSTU2's, still listed by R4 and sent by older servers) failed
    every key: "the answer is application/json+fhir, not FHIR JSON"."""
    obs = diabetes_store(datetime.now(UTC))[1]
    bundle = {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": obs}]}
    found = await one(200, bundle, "application/json+fhir; charset=utf-8").run(QUERY)
    assert [e["resource"]["id"] for e in found["entry"]] == [obs["id"]]


async def test_an_observation_of_another_patient_is_refused() -> None:
    obs = diabetes_store(datetime.now(UTC), pid="p2")[1]
    bundle = {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": obs}]}
    with pytest.raises(SearchFailed, match="Observation/bmi-1 is about another patient"):
        await one(200, bundle).run(QUERY)


async def test_the_search_asked_again_keeps_repeated_parameters_and_reads_an_empty_last_page() -> (
    None
):
    """A server ignoring _sort: the search asked again changes only _count (date=ge..&date=lt..
    both stay), and exactly max_entries results then a next link to an empty page is all of
    them, not "over max_entries"."""
    now = datetime.now(UTC)
    found = [
        observation(f"glu-{k}", LOINC, "2345-7", 90.0 + k, "mg/dL", now - timedelta(days=k + 1))
        for k in range(3)
    ][::-1]  # oldest first
    asked: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        asked.append(str(request.url))
        q = request.url.params
        page = int(q.get("page", "0"))
        size = int(q.get("_count", "1"))
        if q.get("page") is None and size < 3:
            entries, nxt = found[:size], "?page=9"
        else:
            entries, nxt = (found, f"?page={page + 1}&_count=3") if page == 0 else ([], None)
        body: dict[str, Any] = {
            "resourceType": "Bundle",
            "type": "searchset",
            "link": [{"relation": "self", "url": "https://ehr.example/fhir/Observation?x=1"}],
            "entry": [{"resource": r, "search": {"mode": "match"}} for r in entries],
        }
        if nxt is not None:
            body["link"].append({"relation": "next", "url": f"https://ehr.example/fhir/{nxt}"})
        return httpx.Response(200, json=body, headers={"Content-Type": "application/fhir+json"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
        search = FhirSearch(client, "https://ehr.example/fhir", PID, Limits(max_entries=3))
        query = (
            f"patient={PID}&code=http://loinc.org|2345-7&date=ge2026-01-01&date=lt2027-01-01"
            "&_sort=-date&_count=1"
        )
        out = await search.search("Observation", query)
    assert sorted(e["resource"]["id"] for e in out["entry"]) == ["glu-0", "glu-1", "glu-2"]
    again = httpx.URL(asked[1]).params
    assert again.get_list("date") == ["ge2026-01-01", "lt2027-01-01"]
    assert again["_count"] == "3" and len(asked) == 3  # the empty last page was read
