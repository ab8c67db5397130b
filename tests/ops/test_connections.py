"""The connection guard in process (service/connections.py): uvicorn's httptools protocol on a
fake transport, its deadlines fired by hand (no sleeps). The real-server test with a low file
limit is tests/e2e/test_slow_clients.py."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import orjson
import pytest
import uvicorn
from uvicorn.server import ServerState

from service import connections

GET = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"


class Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = b""
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 9) if name in ("sockname", "peername") else default

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += bytes(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def ok(scope: Any, receive: Any, send: Any) -> None:
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
    )
    await send({"type": "http.response.body", "body": b"ok"})


def factory(max_pending: int = 2, max_connections: int = 3, concurrency: int | None = None) -> Any:
    limits = connections.Limits(
        header_timeout_s=10.0,
        body_timeout_s=30.0,
        max_pending=max_pending,
        max_connections=max_connections,
    )
    cls = connections.protocol(connections.Guard(limits))
    limit = connections.uvicorn_limit(concurrency)
    config = uvicorn.Config(ok, log_config=None, limit_concurrency=limit)
    config.load()
    state = ServerState()

    def connect() -> tuple[Any, Transport]:
        proto = cls(config=config, server_state=state, app_state={})
        transport = Transport()
        proto.connection_made(transport)
        return proto, transport

    return connect


async def test_a_new_connection_over_the_pending_cap_closes_the_longest_waiting() -> None:
    connect = factory(max_pending=2, max_connections=10)
    (a, ta), (_, tb) = connect(), connect()
    c, tc = connect()
    assert ta.closed and ta.written == b""  # evicted: the oldest waiting, closed silently
    assert not tb.closed and not tc.closed
    assert a.guard.closed["evicted"] == 1
    c.data_received(GET)  # c has its head: no longer waiting, so not the next to go
    await asyncio.sleep(0)  # the app answers
    assert tc.written.startswith(b"HTTP/1.1 200 ")
    # c is waiting again (for its next head), behind b: the next connection closes b.
    connect()
    assert tb.closed and not tc.closed


async def test_with_every_connection_busy_a_new_one_is_refused_with_503() -> None:
    connect = factory(max_pending=10, max_connections=2)
    busy = []
    for _ in range(2):
        proto, transport = connect()
        proto.data_received(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n")
        busy.append((proto, transport))
    proto, transport = connect()
    assert transport.closed and transport.written.startswith(b"HTTP/1.1 503 ")
    assert b"too many connections" in transport.written
    assert b"content-type: application/json" in transport.written  # as every error (review G)
    assert not any(t.closed for _, t in busy)
    for p, _ in busy:  # the clients go: their apps see a disconnect and end
        p.connection_lost(None)
    await asyncio.sleep(0)


async def test_probes_pass_the_concurrency_cap_that_other_requests_meet() -> None:
    """At `max_concurrency` the kubelet's liveness probe got a 503 and restarted a busy pod."""
    connect = factory(max_pending=10, max_connections=10, concurrency=2)
    busy = []
    for _ in range(2):  # two uploads under way: the cap is reached
        proto, transport = connect()
        proto.data_received(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n")
        busy.append(proto)
    answers = {}
    for path in (b"/v1/models", b"/healthz", b"/readyz", b"/v2/health/live", b"/metrics?x=1"):
        proto, transport = connect()
        proto.data_received(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.sleep(0)  # the app (or uvicorn's 503) answers
        answers[path] = transport.written.split(b"\r\n", 1)[0]
        proto.connection_lost(None)
    assert answers.pop(b"/v1/models") == b"HTTP/1.1 503 Service Unavailable"
    assert set(answers.values()) == {b"HTTP/1.1 200 OK"}
    for p in busy:
        p.connection_lost(None)
    await asyncio.sleep(0)


async def test_max_concurrency_requests_are_served_and_one_more_is_refused() -> None:
    """uvicorn counts the asking connection itself: MCSERVE_MAX_CONCURRENCY=1 refused every
    request (503) while the exempt /readyz said ready; N let N - 1 in."""
    for cap in (1, 3):
        connect = factory(max_pending=10, max_connections=10, concurrency=cap)
        busy = []
        for k in range(cap + 1):
            proto, transport = connect()
            proto.data_received(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
            await asyncio.sleep(0)
            status = transport.written.split(b"\r\n", 1)[0]
            expected = b"HTTP/1.1 200 OK" if k < cap else b"HTTP/1.1 503 Service Unavailable"
            assert status == expected, (cap, k)
            if k == cap:  # JSON, Retry-After and an id like every error (uvicorn's: plain text)
                head, body = transport.written.split(b"\r\n\r\n", 1)
                assert b"content-type: application/json" in head and b"retry-after: 1" in head
                assert b"x-request-id: " in head
                assert json.loads(body)["error"].startswith("the server has as many requests")
            busy.append(proto)  # answered, still open: a connection, as uvicorn counts
        assert busy[0].guard.closed["concurrency"] == 1  # uvicorn's 503, counted for /metrics
        for p in busy:
            p.connection_lost(None)
        await asyncio.sleep(0)


async def test_a_head_must_arrive_in_time_also_on_a_kept_alive_connection() -> None:
    connect = factory()
    proto, transport = connect()
    loop = asyncio.get_running_loop()
    assert proto._timer is not None and proto._timer.when() == pytest.approx(
        loop.time() + 10, abs=1
    )
    proto.data_received(GET)
    await asyncio.sleep(0)
    assert transport.written.startswith(b"HTTP/1.1 200 ") and proto._timer is None
    transport.written = b""
    proto.data_received(b"GET /healthz HTTP/1.1\r\nHo")  # the next request, cut short
    assert proto._timer is not None  # armed by its first byte
    proto._timer._run()  # the deadline passes
    assert transport.closed
    assert transport.written.startswith(b"HTTP/1.1 408 ")
    head, body = transport.written.split(b"\r\n\r\n", 1)
    assert b"content-type: application/json" in head  # it was text/plain (review G)
    assert orjson.loads(body)["error"].startswith("no request head within 10 s (setting ")


async def test_a_body_must_arrive_in_time_and_the_app_sees_a_disconnect() -> None:
    connect = factory()
    seen: list[Any] = []

    async def reader(scope: Any, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            seen.append(message["type"])
            if message["type"] == "http.disconnect" or not message.get("more_body"):
                return

    proto, transport = connect()
    proto.app = reader
    proto.data_received(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nab")
    await asyncio.sleep(0)
    assert seen == ["http.request"]  # 2 of 5 bytes: waiting for the rest
    proto._timer._run()
    await asyncio.sleep(0)
    assert seen == ["http.request", "http.disconnect"]
    assert transport.written.startswith(b"HTTP/1.1 408 ") and transport.closed
