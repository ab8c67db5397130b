"""API keys on /v1 and /v2 for every outcome; access logs with request ids and no secrets."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from service.api.app import create_app
from service.api.common.auth import hash_key
from service.logs import JsonFormatter
from service.settings import ApiKey, Settings

KEYS = {"all": "key-all-7f3a", "reg-only": "key-reg-19bd", "admin": "key-admin-55e0"}


@pytest_asyncio.fixture(scope="module")
async def client(repo: Path) -> AsyncIterator[httpx.AsyncClient]:
    keys = [
        ApiKey(id="all", sha256=hash_key(KEYS["all"])),
        ApiKey(id="reg-only", sha256=hash_key(KEYS["reg-only"]), models=["reg"]),
        ApiKey(id="admin", sha256=hash_key(KEYS["admin"]), admin=True),
    ]
    app = create_app(
        Settings(model_dir=repo, api_keys=keys, model_control="explicit", protect_metrics=True)
    )
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            yield c


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


V1 = ("/v1/models/clf:predict", {"instances": [[0.1, 0.2, 0.3, 0.4]]})
V2 = (
    "/v2/models/clf/infer",
    {
        "inputs": [
            {"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [0.1, 0.2, 0.3, 0.4]}
        ]
    },
)


@pytest.mark.parametrize("path, body", [V1, V2], ids=["v1", "v2"])
async def test_key_outcomes(client: httpx.AsyncClient, path: str, body: dict) -> None:
    r = await client.post(path, json=body)
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == 'Bearer realm="mcserve"'
    assert r.json()["error"] == (
        "missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key'"
    )
    r = await client.post(path, json=body, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"] == "invalid API key"
    assert (await client.post(path, json=body, headers=bearer("all"))).status_code == 200
    r = await client.post(path, json=body, headers={"X-API-Key": KEYS["all"]})
    assert r.status_code == 200
    r = await client.post(path, json=body, headers=bearer("reg-only"))
    assert r.status_code == 403
    assert r.json()["error"] == "API key 'reg-only' may not use model 'clf'"


async def test_two_credentials_of_one_kind_are_refused(client: httpx.AsyncClient) -> None:
    """With two Authorization headers the last won: a proxy reading the first and the server
    the last disagreed on who was calling."""
    path, body = V1
    for name in ("Authorization", "X-API-Key"):
        value = bearer("all")["Authorization"] if name == "Authorization" else KEYS["all"]
        other = "Bearer wrong" if name == "Authorization" else "wrong"
        for pair in ([(name, value), (name, other)], [(name, other), (name, value)]):
            r = await client.post(path, json=body, headers=httpx.Headers(pair))
            assert r.status_code == 401, (name, pair)
            assert r.json()["error"].startswith("send one Authorization header")
    both = {"Authorization": bearer("all")["Authorization"], "X-API-Key": KEYS["all"]}
    assert (await client.post(path, json=body, headers=both)).status_code == 200  # one of each


async def test_admin_routes(client: httpx.AsyncClient) -> None:
    url = "/v2/repository/models/reg/load"
    assert (await client.post(url)).status_code == 401
    r = await client.post(url, headers=bearer("all"))
    assert r.status_code == 403
    assert r.json()["error"] == "API key 'all' is not an admin key; repository routes need one"
    r = await client.post(url, headers=bearer("admin"))
    assert r.status_code == 200, r.text


async def test_health_open_metrics_guarded(client: httpx.AsyncClient) -> None:
    for path in ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"):
        assert (await client.get(path)).status_code == 200, path
    assert (await client.get("/metrics")).status_code == 401
    assert (await client.get("/metrics", headers=bearer("all"))).status_code == 200


async def test_access_log_has_request_id_and_no_secrets(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    secret_value = 7.123456789
    token = "eyJhbGciOiJSUzM4NCJ9.secret-token-payload.sig"
    caplog.set_level(logging.INFO)
    body = {"instances": [[secret_value, 0.2, 0.3, 0.4]], "parameters": {"seed": 1}}
    r = await client.post(
        "/v1/models/clf:predict",
        json=body,
        headers={
            "X-API-Key": KEYS["all"],
            "X-Request-ID": "req-42",
            "X-Forwarded-Access-Token": token,
        },
    )
    assert r.status_code == 200 and r.headers["x-request-id"] == "req-42"
    lines = [JsonFormatter().format(rec) for rec in caplog.records]
    access = [json.loads(line) for line in lines if '"mcserve.access"' in line]
    mine = [a for a in access if a.get("request_id") == "req-42"]
    assert len(mine) == 1
    entry = mine[0]
    assert entry["status"] == 200 and entry["model"] == "clf" and entry["version"] == "1"
    assert entry["caller"] == "all" and entry["batch_rows"] == 100
    assert entry["duration_ms"] > 0 and entry["compute_ms"] >= 0 and entry["queue_ms"] >= 0
    for line in lines:
        assert "7.123456" not in line
        assert KEYS["all"] not in line
        assert "secret-token" not in line
