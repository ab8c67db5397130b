"""The prediction routes' fast path (FastRoutes in service/api/front.py): FastAPI's routing is
bypassed, the contract is not. Every other native and OIP test also runs through the fast path;
these pin what is specific to it (tests/fuzz/test_parity.py: the same answers without it)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import fastapi.routing
import httpx
import pytest
import pytest_asyncio
from asgi_scopes import predict_scope
from fastapi import FastAPI
from starlette.middleware.errors import ServerErrorMiddleware
from starlette.middleware.exceptions import ExceptionMiddleware

from service.api import front
from service.api.oip.binary import HEADER

ROW = [0.1, -0.2, 0.3, 0.4]


@pytest_asyncio.fixture
async def counted(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[list[str]]:
    """Paths of the requests FastAPI resolved dependencies for (its routing reached them)."""
    seen: list[str] = []
    original = fastapi.routing.solve_dependencies

    async def counting(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs["request"].url.path)
        return await original(*args, **kwargs)

    monkeypatch.setattr(fastapi.routing, "solve_dependencies", counting)
    yield seen


async def test_json_predictions_bypass_fastapi_routing(
    client: httpx.AsyncClient, counted: list[str]
) -> None:
    for path in ("/v1/models/clf:predict", "/v1/models/clf/versions/1:predict"):
        r = await client.post(path, json={"instances": [ROW], "parameters": {"samples": 10}})
        assert r.status_code == 200, r.text
        assert r.json()["model"]["name"] == "clf"
    assert counted == []
    await client.get("/v1/models/clf")  # the spy works: other routes go through FastAPI
    assert counted == ["/v1/models/clf"]


async def test_oip_inference_bypasses_fastapi_routing(
    client: httpx.AsyncClient, counted: list[str]
) -> None:
    body = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": ROW}]}
    for path in ("/v2/models/clf/infer", "/v2/models/clf/versions/1/infer"):
        r = await client.post(path, json=body)
        assert r.status_code == 200, r.text
        assert r.json()["model_name"] == "clf"
    r = await client.post("/v2/models/clf/infer", json=body, headers={HEADER: "-3"})
    assert r.status_code == 400
    assert "greater than or equal to 0" in r.json()["error"]
    assert counted == []
    text = (await client.get("/metrics")).text
    assert 'route="/v2/models/{name}/versions/{version}/infer"' in text


async def test_mixed_api_paths_are_not_routes(client: httpx.AsyncClient) -> None:
    for path in ("/v1/models/clf/infer", "/v2/models/clf:predict"):
        r = await client.post(path, json={"instances": [ROW]})
        assert r.status_code in (404, 405), (path, r.status_code)


async def test_another_content_type_is_415_naming_json(
    client: httpx.AsyncClient, counted: list[str]
) -> None:
    body = b'{"instances": [[0.1, 0.2, 0.3, 0.4]]}'
    # curl -d sends the form type; text/json was read as JSON here, not by FastAPI's routes.
    for kind in ("text/plain", "application/x-www-form-urlencoded", "text/json"):
        r = await client.post(
            "/v1/models/clf:predict", content=body, headers={"content-type": kind}
        )
        assert r.status_code == 415, r.text  # was 422 "body: Input should be a valid dictionary"
        assert r.json()["error"] == (
            f"Content-Type {kind!r} is not read here; send the body as JSON with "
            "Content-Type: application/json"
        )
    assert counted == []  # answered by the front door
    # No content type is read as JSON, as FastAPI reads it.
    assert (await client.post("/v1/models/clf:predict", content=body)).status_code == 200


async def test_other_methods_on_prediction_routes_are_405(client: httpx.AsyncClient) -> None:
    for path in (
        "/v1/models/clf:predict",
        "/v1/models/nope/versions/1:predict",
        "/v2/models/clf/infer",
    ):
        r = await client.get(path)
        assert r.status_code == 405, r.text  # /v1 was 404 "model 'clf:predict' is not loaded"
        assert r.headers["allow"] == "POST"
        assert r.json()["error"] == f"method GET is not allowed on {path}; send POST"


async def test_metrics_name_the_route_template(client: httpx.AsyncClient) -> None:
    await client.post("/v1/models/clf/versions/1:predict", json={"instances": [ROW]})
    text = (await client.get("/metrics")).text
    assert 'route="/v1/models/{name}/versions/{version}:predict"' in text
    assert "/v1/models/clf/versions/1:predict" not in text


async def test_bad_subject_is_422_with_the_field(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/models/clf:predict?subject=Nobody/1",
        json={"instances": [ROW]},
        headers={"accept": "application/fhir+json"},
    )
    assert r.status_code == 422
    assert r.json()["details"][0]["field"] == "query.subject"
    assert r.json()["error"].startswith("invalid request: query.subject: String should match")


async def test_body_errors_name_body_fields(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/models/clf:predict", json={"instances": [ROW], "parameter": {}})
    assert r.status_code == 422
    assert r.json()["details"][0]["field"] == "parameter"
    assert r.json()["error"].endswith("(unknown key: check its spelling against the API reference)")


async def test_client_gone_while_sending_its_body(
    app: FastAPI, caplog: pytest.LogCaptureFixture
) -> None:
    sent: list[dict[str, Any]] = []
    messages = [
        {"type": "http.request", "body": b'{"instances": [', "more_body": True},
        {"type": "http.disconnect"},
    ]

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = predict_scope([(b"content-type", b"application/json")])
    with caplog.at_level(logging.INFO, logger="mcserve.access"):
        await app(scope, receive, send)
    assert sent == []  # no answer to a closed connection, and no 500 logged
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
    # Counted as the client's leaving (499), not as a server error (it was a 500).
    (line,) = [r for r in caplog.records if r.name == "mcserve.access"]
    assert line.status == 499


async def test_predictions_skip_fastapis_exception_layer_only(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One stack (front.py): predictions pass our middleware and Starlette's server-error
    layer like every request, and skip FastAPI's exception layer and routing only."""
    entered: dict[str, list[str]] = {"server": [], "exceptions": []}

    def spy(cls: Any, key: str) -> None:
        original = cls.__call__

        async def counting(self: Any, scope: Any, receive: Any, send: Any) -> None:
            entered[key].append(scope["path"])
            await original(self, scope, receive, send)

        monkeypatch.setattr(cls, "__call__", counting)

    spy(ServerErrorMiddleware, "server")
    spy(ExceptionMiddleware, "exceptions")
    r = await client.post("/v1/models/clf:predict", json={"instances": [ROW]})
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"]  # our RequestContext ran
    body = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": ROW}]}
    assert (await client.post("/v2/models/clf/infer", json=body)).status_code == 200
    await client.get("/v1/models/clf")
    paths = ["/v1/models/clf:predict", "/v2/models/clf/infer", "/v1/models/clf"]
    assert entered == {"server": paths, "exceptions": ["/v1/models/clf"]}


async def test_an_exception_outside_the_handler_is_a_json_500(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Starlette's ServerErrorMiddleware answers it, with errors.py's 500, as on every route."""

    def broken(*args: Any) -> Any:
        raise RuntimeError("secret detail")

    monkeypatch.setattr(front, "Request", broken)  # before FastRoutes' own error mapping
    r = await client.post("/v1/models/clf:predict", json={"instances": [ROW]})
    assert r.status_code == 500
    assert r.headers["content-type"] == "application/json"
    rid = r.json()["request_id"]
    assert r.json()["error"] == f"internal error; quote request id {rid} when reporting it"
    assert "secret detail" not in r.text and "Traceback" not in r.text
