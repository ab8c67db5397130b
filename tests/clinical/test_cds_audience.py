"""A token's `aud` is the configured public URL, never the client's Host (issue 27, finding 7).

Before: without MCSERVE_PUBLIC_BASE_URL the audience was built from the request's scheme and
Host, which a client chooses (and uvicorn took X-Forwarded-Proto from 127.0.0.1 by default), so a
token the EHR issued for another service passed here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from cds_client import BASE, ISS, Signer
from fastapi import FastAPI
from fhir_ehr import MODELS, diabetes_prefetch, hook_call
from pydantic import ValidationError
from server import ROOT, Server, serve
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from service import server as server_module
from service.api.cds import routes as cds
from service.clinical.trust import TrustConfigError
from service.settings import CdsIssuer, Settings

DIABETES = "/cds-services/diabetes-progression"
OTHER_HOST = "other-service.example"  # another service the same EHR calls
OTHER = f"https://{OTHER_HOST}"
# What a client sends to make the request look as if it arrived at the other service.
SPOOF = {"Host": OTHER_HOST, "X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.9"}
MESSAGE = "MCSERVE_PUBLIC_BASE_URL is not set: set it to the base URL the EHR calls"


def bearer(signer: Signer, aud: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {signer.token(aud)}"}


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCSERVE_")}
    return env | {"PYTHONPATH": str(ROOT), "MCSERVE_COMPUTE_PROCESS": "false"} | extra


# (a) With issuers configured, no start without the public URL.


def test_settings_refuse_issuers_without_public_base_url(jwks: dict[str, Any]) -> None:
    issuers = {ISS: CdsIssuer(jwks=jwks)}
    with pytest.raises(ValidationError, match=MESSAGE):
        Settings(cds_issuers=issuers)
    # With the URL, without issuers, or with authentication off (development) it starts.
    assert Settings(cds_issuers=issuers, public_base_url=BASE).public_base_url == BASE
    assert Settings().cds_issuers == {}
    assert Settings(cds_issuers=issuers, cds_require_jwt=False).public_base_url is None
    with pytest.raises(ValidationError, match="not an absolute http"):
        Settings(cds_issuers=issuers, public_base_url="mcserve.example.org")


def test_cds_refuses_to_build_from_settings_that_skipped_validation(jwks: dict[str, Any]) -> None:
    settings = Settings(cds_issuers={ISS: CdsIssuer(jwks=jwks)}, public_base_url=BASE)
    with pytest.raises(TrustConfigError, match=MESSAGE):
        cds.build(settings.model_copy(update={"public_base_url": None}))


def test_serve_exits_with_the_message(tmp_path: Path, jwks: dict[str, Any]) -> None:
    env = clean_env(MCSERVE_CDS_ISSUERS=json.dumps({ISS: {"jwks": jwks}}))
    cmd = [sys.executable, "-m", "service", "serve", "--port", "0", "--model-dir", str(tmp_path)]
    # Before the fix this started a server: the timeout ends the test as a failure.
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert MESSAGE in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


# (b) A token for another service is refused, whatever Host and X-Forwarded-Proto say.


@pytest_asyncio.fixture
async def behind_local_proxy(cds_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """The app as uvicorn ran it by default: X-Forwarded-* believed from 127.0.0.1."""
    app = ProxyHeadersMiddleware(cds_app, trusted_hosts="127.0.0.1")
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


async def test_token_for_another_service_is_refused(
    cds_app: FastAPI, behind_local_proxy: httpx.AsyncClient, es384: Signer
) -> None:
    body = hook_call(diabetes_prefetch(datetime.now(UTC)))
    r = await behind_local_proxy.post(
        DIABETES, json=body, headers=SPOOF | bearer(es384, OTHER + DIABETES)
    )
    assert (r.status_code, r.content) == (401, b"")
    # Control: the same headers with a token for this service's public URL are answered.
    r = await behind_local_proxy.post(
        DIABETES, json=body, headers=SPOOF | bearer(es384, BASE + DIABETES)
    )
    assert r.status_code == 200, r.text


async def test_no_public_url_at_request_time_means_no_audience(
    cds_app: FastAPI,
    behind_local_proxy: httpx.AsyncClient,
    es384: Signer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Settings that skipped validation: the audience must not fall back to Host (it did).
    clinical = cds_app.state.cds
    monkeypatch.setattr(
        clinical, "settings", clinical.settings.model_copy(update={"public_base_url": None})
    )
    body = hook_call(diabetes_prefetch(datetime.now(UTC)))
    for path in (DIABETES, DIABETES + "/feedback"):
        r = await behind_local_proxy.post(
            path, json=body, headers=SPOOF | bearer(es384, OTHER + path)
        )
        assert (r.status_code, r.content) == (401, b""), path


# (c) A real server believes no X-Forwarded-* header by default, not even from 127.0.0.1.


@pytest.fixture(scope="module")
def cds_server(tmp_path_factory: pytest.TempPathFactory, jwks: dict[str, Any]) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("cds-server")
    env = {
        "MCSERVE_CDS_ISSUERS": json.dumps({ISS: {"jwks": jwks}}),
        "MCSERVE_PUBLIC_BASE_URL": BASE,
        "MCSERVE_CDS_MAPPING_DIR": str(MODELS / "clinical"),
        "MCSERVE_COMPUTE_PROCESS": "false",
    }
    empty = tmp / "models"  # no model: the server is ready at once; auth runs before lookup
    empty.mkdir()
    with serve(tmp, model_dir=empty, env=env) as srv:
        yield srv


def test_server_ignores_forwarded_headers_by_default(cds_server: Server) -> None:
    with httpx.Client(base_url=cds_server.url, timeout=10) as c:
        # The redirect to the canonical path is relative: no scheme or host a forwarded
        # header (believed or not) could set goes into it.
        r = c.get("/cds-services/", headers={"X-Forwarded-Proto": "https", "Host": "evil.example"})
        assert r.status_code == 307
        assert r.headers["location"] == "/cds-services"


def test_server_checks_aud_against_the_public_url(cds_server: Server, es384: Signer) -> None:
    with httpx.Client(base_url=cds_server.url, timeout=10) as c:
        r = c.post(DIABETES, json={}, headers=SPOOF | bearer(es384, OTHER + DIABETES))
        assert (r.status_code, r.content) == (401, b"")
        # A token for the public URL passes authentication (404: no model is loaded here).
        r = c.post(DIABETES, json={}, headers=bearer(es384, BASE + DIABETES))
        assert r.status_code == 404, r.text


def test_uvicorn_gets_the_configured_proxies(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    configs = []
    monkeypatch.setattr(
        server_module.DrainingServer, "run", lambda self, sockets=None: configs.append(self.config)
    )
    server_module.run({"model_dir": tmp_path, "log_format": "text"})
    server_module.run(
        {"model_dir": tmp_path, "log_format": "text", "forwarded_allow_ips": ["10.0.0.0/8"]}
    )
    assert configs[0].proxy_headers is False
    assert configs[1].proxy_headers is True
    assert configs[1].forwarded_allow_ips == ["10.0.0.0/8"]
    with pytest.raises(ValidationError, match="not an IP address"):
        Settings(forwarded_allow_ips=["ingress.internal"])
