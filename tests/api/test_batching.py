"""Batching under concurrency, overload, deadlines, disconnects and error isolation."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import orjson
import pytest
from asgi_scopes import predict_scope
from fastapi import FastAPI

from service.api.common.state import AppState
from service.engine import batcher as batcher_module
from service.engine.batcher import Batcher


def state(app: FastAPI) -> AppState:
    st: AppState = app.state.mcserve
    return st


def batcher(app: FastAPI, name: str = "clf") -> Batcher:
    return state(app).batchers[(name, "1")]


@contextmanager
def compute_blocked(app: FastAPI) -> Iterator[None]:
    """Occupy the single compute worker so that requests stay queued."""
    gate = threading.Event()
    job = state(app).executor.submit(gate.wait)
    try:
        yield
    finally:
        gate.set()
        job.result()


async def until(cond: Any, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.005)):
        if cond():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not reached")


def body(seed: int, row: list[float], samples: int = 100) -> dict[str, Any]:
    return {"instances": [row], "parameters": {"samples": samples, "seed": seed}}


async def test_concurrent_seeded_requests_share_forwards(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    rows = [[(i % 7) / 7, (i % 5) / 5, -(i % 3) / 3, 0.5] for i in range(200)]
    alone = []
    for i, row in enumerate(rows):
        r = await client.post("/v1/models/clf:predict", json=body(1000 + i, row))
        alone.append(r.json()["predictions"])
    sampler = batcher(app).model.sampler
    before = sampler.stats.forwards
    responses = await asyncio.gather(
        *(
            client.post("/v1/models/clf:predict", json=body(1000 + i, row))
            for i, row in enumerate(rows)
        )
    )
    forwards = sampler.stats.forwards - before
    assert all(r.status_code == 200 for r in responses)
    assert forwards <= 25, forwards
    for r, expected in zip(responses, alone, strict=True):
        got = r.json()["predictions"]
        diff = {k for k in expected[0] if got[0][k] != expected[0][k]}
        assert got == expected, diff  # bit for bit (floats round-trip exactly)


async def test_overload_answers_429_with_retry_after(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    b = batcher(app)
    saved = b.max_queue_rows
    b.max_queue_rows = 500
    try:
        with compute_blocked(app):
            first = asyncio.ensure_future(
                client.post("/v1/models/clf:predict", json=body(1, [0, 0, 0, 0], samples=300))
            )
            await until(lambda: b.stats.queue_rows == 300)
            r = await client.post("/v1/models/clf:predict", json=body(2, [0, 0, 0, 0], 300))
            assert r.status_code == 429
            assert int(r.headers["retry-after"]) >= 1
            # From the rate turns measure, and bounded: an average over tiny batches (mostly
            # fixed cost) told clients to wait 15 minutes for a queue that drained in 0.3 s.
            saved_rate = b.turns.rate
            try:
                b.turns.rate = 1_000.0  # cost units a second
                assert b.retry_after_s() == 1  # 300 queued
                assert b.retry_after_s(1_000_000) == batcher_module.RETRY_AFTER_MAX_S
                # No batch of MIN_ROWS yet (MAX_BATCH_ROWS under it): every batch's average.
                b.turns.rate, b._rows_per_s = None, 100.0
                assert b.retry_after_s() == 3  # 300 queued at 100 a second
            finally:
                b.turns.rate = saved_rate
            assert r.json()["error"] == (
                "model 'clf' is at capacity; retry after the indicated delay"
            )
        assert (await first).status_code == 200  # nothing lost
    finally:
        b.max_queue_rows = saved


async def test_request_larger_than_queue_is_413(app: FastAPI, client: httpx.AsyncClient) -> None:
    b = batcher(app)
    saved = b.max_queue_rows
    b.max_queue_rows = 500
    try:
        r = await client.post("/v1/models/clf:predict", json=body(1, [0, 0, 0, 0], samples=600))
        assert r.status_code == 413
        assert "more than the queue holds (500)" in r.json()["error"]
    finally:
        b.max_queue_rows = saved


async def test_deadline_passes_in_queue_no_compute(app: FastAPI, client: httpx.AsyncClient) -> None:
    b = batcher(app)
    now = [1000.0]
    saved = b.clock
    b.clock = lambda: now[0]
    rows_before = b.model.sampler.stats.rows
    expired_before = b.stats.expired
    try:
        with compute_blocked(app):
            req = dict(body(3, [0, 0, 0, 0]))
            # 30 s of real time for its deadline's timer; the injected clock passes it at once.
            req["parameters"] = {**req["parameters"], "timeout_ms": 30_000}
            pending = asyncio.ensure_future(client.post("/v1/models/clf:predict", json=req))
            await until(lambda: b.stats.queue_rows == 100)
            now[0] += 31.0  # the injected clock passes the deadline while the worker is busy
        r = await pending
    finally:
        b.clock = saved
    assert r.status_code == 504
    assert r.json()["error"].startswith("the request's deadline passed while it waited")
    assert b.stats.expired == expired_before + 1
    assert b.model.sampler.stats.rows == rows_before  # no compute spent


# Bounds the answer's time (under 2 s): run alone (the Makefile's serial phase).
@pytest.mark.serial
async def test_a_queued_request_is_answered_at_its_deadline(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    """Its deadline was checked only when a batch reached it: behind a busy compute (a long
    request, a turn) it was answered seconds late. A timer now answers it when it passes."""
    b = batcher(app)
    rows_before, expired_before = b.model.sampler.stats.rows, b.stats.expired
    queued_before = b.stats.queue_rows
    with compute_blocked(app):  # held for as long as the test waits
        req = dict(body(5, [0, 0, 0, 0]))
        req["parameters"] = {**req["parameters"], "timeout_ms": 200}
        start = asyncio.get_running_loop().time()
        r = await asyncio.wait_for(client.post("/v1/models/clf:predict", json=req), 5.0)
        took = asyncio.get_running_loop().time() - start
        assert r.status_code == 504 and 0.15 < took < 2.0, (r.status_code, took)
        # Its batch had left the queue (for the thread, behind the held one): in flight.
        assert r.json()["error"].startswith("the request's deadline passed before its batch")
        assert b.stats.expired == expired_before + 1
    await until(lambda: b.stats.queue_rows == queued_before)  # its batch landed, dropped
    assert b.model.sampler.stats.rows == rows_before  # no compute spent: screened
    assert b.stats.expired == expired_before + 1  # counted once


async def test_client_disconnect_drops_queued_work(app: FastAPI) -> None:
    b = batcher(app)
    payload = orjson.dumps(body(4, [0, 0, 0, 0]))
    gone = asyncio.Event()
    sent: list[dict[str, Any]] = []
    messages = [{"type": "http.request", "body": payload, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = predict_scope(
        [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode()),
        ]
    )
    rows_before = b.model.sampler.stats.rows
    cancelled_before = b.stats.cancelled
    with compute_blocked(app):
        call = asyncio.ensure_future(app(scope, receive, send))
        await until(lambda: b.stats.queue_rows == 100)
        gone.set()  # the client goes away while its request is queued
        await until(call.done)  # the handler gave up at once, before any compute
    await call
    await until(lambda: b.stats.queue_rows == 0)
    assert b.stats.cancelled == cancelled_before + 1
    assert b.model.sampler.stats.rows == rows_before


async def test_one_failure_fails_only_its_request(
    app: FastAPI, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = batcher(app).model
    original = model.summarize

    def flaky(samples: Any, req: Any, params: Any) -> Any:
        if req.seed == 666:
            raise RuntimeError("secret internal detail")
        return original(samples, req, params)

    monkeypatch.setattr(model, "summarize", flaky)
    with compute_blocked(app):
        bad = asyncio.ensure_future(client.post("/v1/models/clf:predict", json=body(666, [0] * 4)))
        good = asyncio.ensure_future(client.post("/v1/models/clf:predict", json=body(5, [0] * 4)))
        await until(lambda: batcher(app).stats.queue_rows == 200)
    rb, rg = await bad, await good
    assert rg.status_code == 200
    assert rb.status_code == 500
    rid = rb.headers["x-request-id"]
    assert rb.json() == {
        "error": f"internal error; quote request id {rid} when reporting it",
        "request_id": rid,
    }
    assert "secret" not in rb.text and "Traceback" not in rb.text


async def test_sampler_failure_isolated(
    app: FastAPI, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    sampler = batcher(app).model.sampler
    original = sampler.run

    def run(reqs: Any) -> Any:
        if any(r.seed == 667 for r in reqs):
            raise RuntimeError("bad rows")
        return original(reqs)

    monkeypatch.setattr(sampler, "run", run)
    with compute_blocked(app):
        bad = asyncio.ensure_future(client.post("/v1/models/clf:predict", json=body(667, [0] * 4)))
        good = asyncio.ensure_future(client.post("/v1/models/clf:predict", json=body(6, [0] * 4)))
        await until(lambda: batcher(app).stats.queue_rows == 200)
    assert (await good).status_code == 200
    assert (await bad).status_code == 500


async def test_a_failing_metrics_hook_loses_no_answer(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    b = batcher(app)
    saved = b.on_result

    def broken(*_: object) -> None:
        raise RuntimeError("metrics down")

    b.on_result = broken
    try:
        r = await client.post("/v1/models/clf:predict", json=body(9, [0.0, 0.0, 0.0, 0.0]))
    finally:
        b.on_result = saved
    assert r.status_code == 200, r.text
    assert b.stats.queue_rows == 0


async def test_a_cancelled_request_sets_its_flag_for_the_compute(app: FastAPI) -> None:
    """A client that goes while its request computes: the compute reads its flag between chunks
    (tests/engine/test_deadlines.py), so cancelling the future must set it."""
    import numpy as np

    from service.engine.params import PredictParams

    b = batcher(app)
    with compute_blocked(app):
        params = PredictParams(samples=100, confidence=(0.9,), seed=1)
        kept = b.enqueue(np.zeros((1, 4), np.float32), params)
        gone = b.enqueue(np.zeros((1, 4), np.float32), params)
        await until(lambda: b.stats.queue_rows == 200)
        items = [i for q in b.backlog._queues.values() for i in q]
        flags = {id(i.future): i.req.cancel for i in items if i.req is not None}
        gone.cancel()
        await asyncio.sleep(0)  # done callbacks run on the loop's next turn
        assert flags[id(gone)] is not None and flags[id(gone)].is_set()
        assert flags[id(kept)] is not None and not flags[id(kept)].is_set()
    await kept


async def test_the_operators_default_deadline_applies_to_requests_without_one(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    """MCSERVE_REQUEST_TIMEOUT_MS bounds a request that sets no timeout_ms (a long one held the
    compute for as long as it took); a request's own timeout_ms still wins."""
    st = state(app)
    saved = st.settings
    st.settings = saved.model_copy(update={"request_timeout_ms": 1e-6})  # passed at once
    try:
        r = await client.post("/v1/models/clf:predict", json=body(5, [0, 0, 0, 0]))
        assert r.status_code == 504 and "deadline passed" in r.json()["error"], r.text
        own = body(5, [0, 0, 0, 0])
        own["parameters"]["timeout_ms"] = 60_000
        r = await client.post("/v1/models/clf:predict", json=own)
        assert r.status_code == 200, r.text
    finally:
        st.settings = saved


async def test_a_deadline_passing_during_compute_is_a_504_counted_as_expired(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    """The screen sees the request alive (the batcher's clock, held still here), the compute
    sees its deadline passed (real time: 1 microsecond): stopped there, or answered first by
    its deadline's timer; 504, counted once as expired."""
    b = batcher(app)
    saved = b.clock
    b.clock = lambda: 1000.0
    expired, failed = b.stats.expired, b.stats.failed
    try:
        req = body(6, [0, 0, 0, 0])
        req["parameters"]["timeout_ms"] = 0.001
        r = await client.post("/v1/models/clf:predict", json=req)
    finally:
        b.clock = saved
    assert r.status_code == 504
    error = r.json()["error"]
    assert error.startswith("the request's deadline passed ") and "compute" in error, error
    await until(lambda: b.stats.queue_rows == 0)  # its batch landed too
    assert (b.stats.expired, b.stats.failed) == (expired + 1, failed)


async def test_a_deadline_counts_from_the_requests_arrival(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deadline started after the body was read, parsed and converted: 9 texts of 100 kB
    (tokenized off the loop, behind each other) were answered 200 at five times their
    timeout_ms. Here the conversion is made slow: past the deadline, the answer is a 504."""
    import time

    from service.api.native import predict

    convert = predict.to_array

    def slow(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.3)
        return convert(*args, **kwargs)

    monkeypatch.setattr(predict, "to_array", slow)
    for ms, status in ((100, 504), (5000, 200)):
        sent = body(1, [0, 0, 0, 0], 4)
        sent["parameters"]["timeout_ms"] = ms
        r = await client.post("/v1/models/clf:predict", json=sent)
        assert r.status_code == status, r.text
