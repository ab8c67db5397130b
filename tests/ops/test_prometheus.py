"""/metrics in Prometheus exposition format, parsed by prometheus_client's own parser."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from service.api.app import create_app
from service.settings import Settings

PREDICT = "/v1/models/{name}:predict"


@pytest_asyncio.fixture(scope="module")
async def client(repo: Path) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(Settings(model_dir=repo))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            yield c


async def scrape(client: httpx.AsyncClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = await client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(m: dict, name: str, **labels: str) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_counters_and_histograms_move(client: httpx.AsyncClient) -> None:
    before = await scrape(client)
    body = {"instances": [[0.1, 0.2, 0.3, 0.4]] * 3, "parameters": {"samples": 50, "seed": 1}}
    assert (await client.post("/v1/models/clf:predict", json=body)).status_code == 200
    after = await scrape(client)
    req = {"model": "clf", "route": PREDICT, "status": "200"}
    assert (
        value(after, "mcserve_requests_total", **req)
        == value(before, "mcserve_requests_total", **req) + 1
    )
    assert (
        value(after, "mcserve_passes_total", model="clf")
        - value(before, "mcserve_passes_total", model="clf")
        == 150
    )
    for hist in (
        "mcserve_queue_duration_seconds_count",
        "mcserve_compute_duration_seconds_count",
        "mcserve_batch_rows_count",
    ):
        assert value(after, hist, model="clf") >= value(before, hist, model="clf") + 1, hist
    mi = "mcserve_mutual_information_count"
    assert value(after, mi, model="clf") == value(before, mi, model="clf") + 3
    dur = {"model": "clf", "route": PREDICT}
    assert value(after, "mcserve_request_duration_seconds_count", **dur) >= 1
    info = [k for k in after if k[0] == "mcserve_model_info"]
    assert {dict(k[1])["model"] for k in info} == {"clf", "reg"}
    assert all(dict(k[1])["digest"].startswith("sha256:") for k in info)
    reg_body = {"instances": [[0.1, 0.2, 0.3]], "parameters": {"samples": 20}}
    assert (await client.post("/v1/models/reg:predict", json=reg_body)).status_code == 200
    assert value(await scrape(client), "mcserve_epistemic_std_count", model="reg") >= 1


async def test_unknown_model_creates_no_series(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/models/made-up-name:predict", json={"instances": [[1]]})
    assert r.status_code == 404
    text = (await client.get("/metrics")).text
    assert "made-up-name" not in text
    after = await scrape(client)
    assert (
        value(after, "mcserve_requests_total", model="(unknown)", route=PREDICT, status="404") >= 1
    )


async def test_internal_errors_counted(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.api.native import predict as native

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("unexpected")

    before = await scrape(client)
    monkeypatch.setattr(native, "to_array", boom)
    r = await client.post("/v1/models/clf:predict", json={"instances": [[0, 0, 0, 0]]})
    assert r.status_code == 500
    after = await scrape(client)
    key = {"route": PREDICT}
    assert (
        value(after, "mcserve_internal_errors_total", **key)
        == value(before, "mcserve_internal_errors_total", **key) + 1
    )
