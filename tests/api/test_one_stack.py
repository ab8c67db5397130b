"""One middleware stack for every route (service/api/front.py), with and without the fast path:
the API-key guard and middleware added after create_app see the prediction routes too, and the
body limit's 413 is shaped by route family like every other error (errors.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.app import create_app
from service.api.common.auth import hash_key
from service.settings import ApiKey, Settings

ROUTES = [
    ("POST", "/v1/models/clf:predict"),
    ("POST", "/v1/models/clf/versions/1:predict"),
    ("POST", "/v2/models/clf/infer"),
    ("POST", "/v2/models/clf/versions/1/infer"),
    ("GET", "/v1/models"),
    ("GET", "/v2/models/clf"),
    ("GET", "/metrics"),
]


@asynccontextmanager
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    # No lifespan: every request here is answered before a handler needs the models.
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        yield c


@pytest.mark.parametrize("fast_path", [True, False])
async def test_api_keys_and_later_middleware_guard_every_route(
    tmp_path: Path, fast_path: bool
) -> None:
    keys = [ApiKey(id="k", sha256=hash_key("secret-key"))]
    settings = Settings(model_dir=tmp_path, api_keys=keys, protect_metrics=True)
    app = create_app(settings, fast_path=fast_path)
    seen: list[str] = []

    class Spy:  # an operator's own layer, added after create_app (was skipped by predictions)
        def __init__(self, app: ASGIApp) -> None:
            self.app = app

        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            seen.append(scope["path"])
            await self.app(scope, receive, send)

    app.add_middleware(Spy)
    async with client(app) as c:
        for method, path in ROUTES:
            r = await c.request(method, path, json={})
            assert r.status_code == 401, (path, r.text)
            assert r.headers["www-authenticate"] == 'Bearer realm="mcserve"'
            assert r.json() == {
                "error": "missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key'",
                "request_id": r.headers["x-request-id"],
            }
            r = await c.request(method, path, json={}, headers={"X-API-Key": "wrong"})
            assert (r.status_code, r.json()["error"]) == (401, "invalid API key"), path
    assert seen == [path for _, path in ROUTES for _ in (1, 2)]


@pytest.mark.parametrize("fast_path", [True, False])
async def test_body_over_the_limit_is_413_in_each_familys_shape(
    tmp_path: Path, fast_path: bool
) -> None:
    app = create_app(Settings(model_dir=tmp_path, max_body_bytes=1024), fast_path=fast_path)
    over = "request body is over 1024 bytes (setting max_body_bytes); "
    message = over + (
        "send fewer instances per request, or ask the operator to raise MCSERVE_MAX_BODY_BYTES"
    )
    # A hook call cannot be split (it was told to "split the request"): less prefetch.
    hook = over + (
        "a hook call cannot be split: send less prefetch (fewer or more recent results) or ask "
        "the operator to raise MCSERVE_MAX_BODY_BYTES"
    )
    body, json_type = b"x" * 2000, {"content-type": "application/json"}
    async with client(app) as c:
        r = await c.post("/cds-services/risk", content=body, headers=json_type)
        assert r.status_code == 413
        assert r.headers["content-type"] == "application/fhir+json"  # was JSON {"error"}
        assert r.json() == {
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": "too-long", "diagnostics": hook}],
        }
        r = await c.post("/cds-services/risk/feedback", content=body, headers=json_type)
        assert r.status_code == 413 and r.json()["issue"][0]["diagnostics"] == over + (
            "send fewer feedback entries per call"
        )
        for path in ("/v1/models/clf:predict", "/v2/models/clf/infer"):
            r = await c.post(path, content=body, headers=json_type)
            assert r.status_code == 413
            assert r.headers["content-type"] == "application/json"
            assert r.json() == {"error": message, "request_id": r.headers["x-request-id"]}
