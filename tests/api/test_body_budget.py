"""The server-wide budget of request-body bytes in flight (api/common/inflight.py): a request
whose body would pass it is a 429 with Retry-After in its route family's shape, what it took is
given back, and a gzip body counts what it inflates to. Other requests in flight are stood in
for by taking bytes from the app's budget (tests/e2e/test_bodies_in_flight.py holds real ones)."""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import orjson
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from service.api.common.inflight import BodyBudget

ROW = [0.1, -0.2, 0.3, 0.4]  # the clf model's four features (tests/conftest.py)
JSON = {"content-type": "application/json"}


@contextmanager
def others_hold(app: FastAPI, left: int) -> Iterator[BodyBudget]:
    """Bytes taken as if other requests held all but `left` of the budget, given back after."""
    budget: BodyBudget = app.state.body_budget
    assert budget.held == 0, "a request of another test still holds body bytes"
    taken = budget.limit - left
    budget.take(taken)
    try:
        yield budget
    finally:
        budget.give(taken)


def _message(held: int, limit: int) -> str:
    return (
        f"the server holds {held} bytes of request bodies in flight and this request's would "
        f"pass its limit ({limit} bytes, setting max_inflight_body_bytes); retry after "
        "Retry-After seconds, on another replica, or send smaller requests"
    )


async def test_a_body_past_the_budget_is_429_with_retry_after(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    v1 = orjson.dumps({"instances": [ROW]})
    v2 = orjson.dumps(
        {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": ROW}]}
    )
    with others_hold(app, len(v1) - 1) as budget:
        held, refused = budget.held, budget.refused
        for path, body in (("/v1/models/clf:predict", v1), ("/v2/models/clf/infer", v2)):
            r = await client.post(path, content=body, headers=JSON)
            assert r.status_code == 429, r.text
            assert r.headers["retry-after"] == "1"
            assert r.json()["error"] == _message(held, budget.limit)
            assert budget.held == held  # nothing kept by the refused request
        assert budget.refused == refused + 2
    # With the room back, the same bodies are answered, and give back what they held.
    r = await client.post("/v1/models/clf:predict", content=v1, headers=JSON)
    assert r.status_code == 200, r.text
    assert app.state.body_budget.held == 0


async def test_a_gzip_body_counts_what_it_inflates_to(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    # 20 kB of JSON (padded with spaces) compresses to well under 1 kB: counted by its wire size
    # alone, it fitted in the 2 kB left.
    plain = orjson.dumps({"instances": [ROW]}) + b" " * 20_000
    packed = gzip.compress(plain)
    assert len(packed) < 1000
    headers = {**JSON, "content-encoding": "gzip"}
    with others_hold(app, 2000) as budget:
        held = budget.held + len(packed)  # the wire bytes are held when the inflation is refused
        r = await client.post("/v1/models/clf:predict", content=packed, headers=headers)
        assert r.status_code == 429, r.text
        assert r.json()["error"] == _message(held, budget.limit)
        assert budget.held == budget.limit - 2000
    r = await client.post("/v1/models/clf:predict", content=packed, headers=headers)
    assert r.status_code == 200, r.text
    assert app.state.body_budget.held == 0


async def test_the_budget_is_in_the_metrics(app: FastAPI, client: httpx.AsyncClient) -> None:
    budget: BodyBudget = app.state.body_budget
    with others_hold(app, 10):
        r = await client.post("/v1/models/clf:predict", json={"instances": [ROW]})
        assert r.status_code == 429
        scrape = (await client.get("/metrics")).text
    values = {
        s.name: s.value
        for family in text_string_to_metric_families(scrape)
        for s in family.samples
        if s.name.startswith(("mcserve_body", "mcserve_bodies"))
    }
    assert values == {
        "mcserve_body_bytes_in_flight": budget.limit - 10,
        "mcserve_body_bytes_limit": budget.limit,
        "mcserve_bodies_refused_total": budget.refused,
    }
    assert budget.refused >= 1


async def test_a_body_no_route_reads_takes_nothing(app: FastAPI, client: httpx.AsyncClient) -> None:
    """A gzip body was read and inflated before routing: posted to a path that reads no body,
    it took the budget (a client without a key could hold it, stalling, until the body
    timeout; review K, D1). It is now inflated only as a route reads it."""
    packed = gzip.compress(b" " * 20_000)
    headers = {**JSON, "content-encoding": "gzip"}
    with others_hold(app, 100) as budget:
        refused = budget.refused
        for path, status in (("/nowhere", 404), ("/healthz", 405), ("/v2/repository/index", 403)):
            r = await client.post(path, content=packed, headers=headers)
            assert r.status_code == status, (path, r.text)
        assert budget.refused == refused
    assert app.state.body_budget.held == 0


async def test_an_unknown_model_is_a_404_before_its_body_is_read(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    """/v1 read the body first, then looked the model up (/v2 did it the other way round): a
    body to a model that is not there held the budget while it arrived (review M, R2)."""
    body = orjson.dumps({"instances": [ROW]}) + b" " * 5000
    with others_hold(app, 100) as budget:
        refused = budget.refused
        r = await client.post("/v1/models/nope:predict", content=body, headers=JSON)
        assert r.status_code == 404, r.text
        assert budget.refused == refused
