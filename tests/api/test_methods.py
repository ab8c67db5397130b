"""Methods and paths a client gets wrong, answered alike with and without the front door's fast
path (service/api/front.py): HEAD on every GET route, another method than POST on a prediction
route, a prediction suffix in the wrong case."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from apps import asgi_client

from service.api.app import create_app
from service.api.common import examples
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = Settings(model_dir=ROOT / "models", compute_process=False)
PREDICT = ("/v1/models/diabetes:predict", "/v1/models/diabetes/versions/1:predict")
INFER = ("/v2/models/diabetes/infer", "/v2/models/diabetes/versions/1/infer")
GETS = (
    "/v1/models",
    "/v1/models/diabetes",
    "/v2",
    "/v2/models/diabetes",
    "/v2/models/diabetes/ready",
    "/v2/health/live",
    "/v2/health/ready",
    "/metrics",
    "/openapi.json",
    "/docs",
    "/models",
    "/models/diabetes",
    "/models/nope",
)


@pytest_asyncio.fixture(scope="module", params=[True, False], ids=["fast", "fastapi"])
async def client(request: pytest.FixtureRequest) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(SETTINGS, fast_path=request.param)
    async with app.router.lifespan_context(app), asgi_client(app) as c:
        yield c


@pytest.mark.parametrize("path", GETS)
async def test_head_is_get_without_the_body(client: httpx.AsyncClient, path: str) -> None:
    got, head = await client.get(path), await client.head(path)
    assert head.status_code == got.status_code, (path, head.status_code, got.status_code)
    assert head.content == b""
    if path != "/metrics":  # which counts the GET just made
        assert head.headers["content-length"] == str(len(got.content))
    assert head.headers["content-type"] == got.headers["content-type"]


@pytest.mark.parametrize("path", PREDICT + INFER)
@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
async def test_another_method_on_a_prediction_route(
    client: httpx.AsyncClient, method: str, path: str
) -> None:
    r = await client.request(method, path)
    assert r.status_code == 405, r.text
    assert r.headers["allow"] == "POST"
    assert r.json()["error"] == f"method {method} is not allowed on {path}; send POST"


async def test_a_prediction_suffix_in_another_case(client: httpx.AsyncClient) -> None:
    body = {"instances": [examples.instance("diabetes")]}
    r = await client.post("/v1/models/diabetes:PREDICT", json=body)
    assert r.status_code == 404, r.text
    assert "allow" not in r.headers
    assert "ends in ':predict' (lower case)" in r.json()["error"]


async def test_head_is_counted_under_its_route(client: httpx.AsyncClient) -> None:
    """HEAD ran on a copy of the request's scope: the route the router found was not seen, and
    metrics and the access log counted it "(unmatched)", with no model."""

    def unmatched(text: str) -> float:
        lines = [ln for ln in text.splitlines() if ln.startswith("mcserve_requests_total{")]
        return sum(float(ln.rsplit(" ", 1)[1]) for ln in lines if "(unmatched)" in ln)

    before = unmatched((await client.get("/metrics")).text)
    for path in ("/v1/models/diabetes", "/v2/models/diabetes/ready", PREDICT[0]):
        await client.head(path)
    assert unmatched((await client.get("/metrics")).text) == before


async def test_an_extra_element_is_named_by_its_index() -> None:
    """An instance one element too long, the extra one null: naming it read feature_names[10]
    (IndexError, a 500)."""
    app = create_app(SETTINGS)
    async with app.router.lifespan_context(app), asgi_client(app) as c:
        body = {"instances": [[*examples.ROWS["diabetes"], None]]}
        r = await c.post(PREDICT[0], json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "instance 0, element 10: null is not a number; send a value"


async def test_a_cors_preflight_for_head_is_allowed() -> None:
    app = create_app(Settings(model_dir=ROOT / "models", cors_origins=["https://ui.example"]))
    async with app.router.lifespan_context(app), asgi_client(app) as c:
        r = await c.options(
            "/v1/models",
            headers={"origin": "https://ui.example", "access-control-request-method": "HEAD"},
        )
    assert r.status_code == 200, r.text


async def test_deterministic_requests_are_not_refused_for_mc_parameters() -> None:
    """mode=deterministic runs one pass: samples over max_samples, a model default over it, and
    a classifier's interval=gaussian were refused (422 on /v1, 400 on /v2), where README says
    the ignored parameters are named in a warning."""
    app = create_app(Settings(model_dir=ROOT / "models", max_samples=50, compute_process=False))
    det = {"mode": "deterministic"}
    async with app.router.lifespan_context(app), asgi_client(app) as c:
        for params, model in (
            (det, "diabetes"),  # its default samples (100) is over 50
            ({**det, "samples": 5000}, "diabetes"),
            ({**det, "interval": "gaussian"}, "breast-cancer"),
        ):
            body = {"instances": [examples.instance(model)], "parameters": params}
            r = await c.post(f"/v1/models/{model}:predict", json=body)
            assert r.status_code == 200, (params, r.text)
            named = [k for k in params if k != "mode"]
            said = " ".join(r.json().get("warnings", []))
            assert all(k in said for k in named), (named, said)  # named, not refused
        tensor = {"name": "input", "shape": [1, 10], "datatype": "FP32"}
        body2 = {"inputs": [{**tensor, "data": examples.ROWS["diabetes"]}], "parameters": det}
        r = await c.post("/v2/models/diabetes/infer", json=body2)
        assert r.status_code == 200, r.text


async def test_a_level_near_1_is_named_as_sent() -> None:
    """0.9999999 printed as "1" (:g): "per-class intervals omitted at 1", "the 100 % set"."""
    app = create_app(SETTINGS)
    body = {
        "instances": [examples.instance("digits")],
        "parameters": {"samples": 10, "confidence": 0.9999999, "seed": 1},
    }
    async with app.router.lifespan_context(app), asgi_client(app) as c:
        r = await c.post("/v1/models/digits:predict", json=body)
    said = " ".join(r.json()["warnings"])
    assert "omitted at 0.9999999 (needs samples >= 20000000)" in said, said
