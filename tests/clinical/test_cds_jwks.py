"""Keys that rotate: an issuer's JWKS served over HTTP on 127.0.0.1, rotated mid-test.

Authenticated calls answer 404 here (no model is loaded, and the service is looked up after the
token is checked); refused ones a bare 401.
"""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from cds_client import BASE, ISS, Signer
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi import FastAPI
from fhir_ehr import MODELS

from service.api.app import create_app
from service.settings import CdsIssuer, Settings

PATH = "/cds-services/diabetes-progression"


class Publisher:
    """What the issuer publishes, and how often it was asked."""

    def __init__(self) -> None:
        self.jwks: dict[str, Any] = {"keys": []}
        self.cache_control = "max-age=600"
        self.requests = 0


@pytest.fixture(scope="module")
def signers() -> dict[str, Signer]:
    return {k: Signer(ec.generate_private_key(ec.SECP384R1()), "ES384", k) for k in "abc"}


@pytest.fixture(scope="module")
def publisher() -> Iterator[tuple[Publisher, str]]:
    pub = Publisher()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            pub.requests += 1
            if self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", "/jwks")
                self.end_headers()
                return
            body = json.dumps(pub.jwks).encode()
            if self.path == "/huge":
                body = json.dumps({"keys": pub.jwks["keys"], "pad": "x" * 100_000}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Cache-Control", pub.cache_control)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield pub, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest_asyncio.fixture(scope="module")
async def app(
    publisher: tuple[Publisher, str], tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[FastAPI]:
    _, url = publisher
    issuer = CdsIssuer(jku=[f"{url}/jwks", f"{url}/redirect", f"{url}/huge"])
    settings = Settings(
        model_dir=Path(tmp_path_factory.mktemp("no-models")),
        cds_mapping_dir=MODELS / "clinical",
        cds_issuers={ISS: issuer},
        public_base_url=BASE,
    )
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application


async def status(app: FastAPI, signer: Signer, jku: str) -> int:
    token = signer.token(BASE + PATH, headers={"jku": jku})
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        r = await c.post(PATH, json={}, headers={"Authorization": f"Bearer {token}"})
    if r.status_code == 401:
        assert r.content == b""
    return r.status_code


async def test_keys_rotate(
    app: FastAPI, publisher: tuple[Publisher, str], signers: dict[str, Signer]
) -> None:
    pub, url = publisher
    jwks = f"{url}/jwks"
    clock = [1000.0]
    fetcher = app.state.cds.jwks
    fetcher.clock = lambda: clock[0]
    a, b, c = signers["a"], signers["b"], signers["c"]
    pub.jwks = {"keys": [a.public_jwk()]}
    pub.requests = 0
    assert await status(app, a, jwks) == 404  # fetched, verified
    assert await status(app, a, jwks) == 404  # cached (max-age=600): no second request
    assert pub.requests == 1
    # Rotation: the issuer now publishes b only; a token naming b makes the service refetch.
    pub.jwks = {"keys": [b.public_jwk()]}
    clock[0] += 31  # past the refresh rate limit (30 s)
    assert await status(app, b, jwks) == 404
    assert pub.requests == 2
    assert await status(app, a, jwks) == 401  # a is gone from the set
    # Made-up kids: refused, and at most one refetch per 30 s, however many arrive.
    for _ in range(5):
        assert await status(app, c, jwks) == 401
    assert pub.requests == 2
    clock[0] += 31
    assert await status(app, c, jwks) == 401
    assert pub.requests == 3
    # The cached set expires after max-age: the next token refetches, even for a known kid.
    clock[0] += 601
    assert await status(app, b, jwks) == 404
    assert pub.requests == 4


async def test_jku_off_the_list_redirects_and_huge_sets_are_refused(
    app: FastAPI, publisher: tuple[Publisher, str], signers: dict[str, Signer]
) -> None:
    pub, url = publisher
    a = signers["a"]
    pub.jwks = {"keys": [a.public_jwk()]}
    pub.requests = 0
    assert await status(app, a, f"{url}/jwks?other") == 401  # not on the list: never fetched
    assert pub.requests == 0
    assert await status(app, a, f"{url}/redirect") == 401  # a redirect is not followed
    assert await status(app, a, f"{url}/huge") == 401  # over 64 KiB
    assert pub.requests == 2


def test_jku_must_be_https() -> None:
    with pytest.raises(ValueError, match="https"):
        CdsIssuer(jku=["http://keys.example.org/jwks"])
    assert CdsIssuer(jku=["https://keys.example.org/jwks"]).jku
