"""What fuzzing found, pinned: each was a wrong status (a 400, a 500 or a refusal of a valid
request) on /v1 before its fix."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from service.api.app import create_app
from service.api.common import examples
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
URL = "/v1/models/diabetes:predict"


@pytest_asyncio.fixture(scope="module")
async def client() -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(Settings(model_dir=ROOT / "models", max_body_bytes=2000))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            yield c


async def test_body_not_utf8_is_a_bad_request(client: httpx.AsyncClient) -> None:
    r = await client.post(URL, content=b"\xff", headers={"content-type": "application/json"})
    assert r.status_code == 422  # FastAPI's own answer was a 400, off the /v1 contract
    assert r.json()["error"] == "invalid request: body: cannot be parsed; send JSON in UTF-8"


async def test_chunked_body_over_the_limit_is_413(client: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: tripped while reading
        yield b'{"instances": [' + b"1," * 3000 + b"1]}"

    for url in (URL, "/v2/models/diabetes/infer"):
        r = await client.post(url, content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413, url
        assert r.json()["error"] == (
            "request body is over 2000 bytes (setting max_body_bytes); "
            "send fewer instances per request, or ask the operator to raise MCSERVE_MAX_BODY_BYTES"
        )


@pytest.mark.parametrize("as_object", [False, True])
async def test_integer_too_large_for_a_float(client: httpx.AsyncClient, as_object: bool) -> None:
    names = ["age", "sex", "bmi", "bp", "tc", "ldl", "hdl", "tch", "ltg", "glu"]
    row = [50, 1, 25, 90, 200, 100, 50, 4, 4.5, 90]
    good = dict(zip(names, row, strict=True)) if as_object else list(row)
    row[2] = 10**400  # json writes all 401 digits; a float64 cannot hold it
    bad = dict(zip(names, row, strict=True)) if as_object else row
    r = await client.post(URL, json={"instances": [good, bad]})
    assert r.status_code == 422  # was a 500 (OverflowError), then the generic shape message
    assert r.json()["error"] == (
        "instance 1, feature 'bmi': an integer of about 400 digits is beyond what the model's "
        "float32 inputs hold (magnitude at most 3.40282e+38); check the value and its unit"
    )


async def test_classifier_with_fewer_passes_than_any_interval_needs(
    client: httpx.AsyncClient,
) -> None:
    body = {"instances": [examples.instance("digits")], "parameters": {"samples": 10}}
    r = await client.post("/v1/models/digits/versions/1:predict", json=body)
    assert r.status_code == 200, r.text  # was 422 "give between 1 and 5 confidence levels"
    (p,) = r.json()["predictions"]
    assert all(ivs == [] for ivs in p["intervals"].values())
    assert r.json()["warnings"] == [
        "per-class intervals omitted at 0.95 (needs samples >= 40); got samples=10"
    ]
