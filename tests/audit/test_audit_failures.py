"""The store goes down: records wait in the queue; a full queue fails closed (503) or, by
setting, open (answered, counted, logged); nothing queued is lost once the store is back."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
from audit_proxy import Proxy
from audit_support import Backend, pg_backend, serving

ROW = [0.1, -0.2, 0.3, 0.4]


@dataclass
class Outage:
    """A real store that a test can take down and bring back."""

    backend: Backend
    proxy: Proxy | None = None
    lock: sqlite3.Connection | None = field(default=None, repr=False)

    def stop(self) -> None:
        if self.proxy is not None:  # PostgreSQL: the network path is cut
            self.proxy.stop()
        else:  # SQLite: another process holds the write lock
            self.lock = sqlite3.connect(self.backend.settings["audit_path"], isolation_level=None)
            self.lock.execute("BEGIN EXCLUSIVE")

    def start(self) -> None:
        if self.proxy is not None:
            self.proxy.start()
        elif self.lock is not None:
            self.lock.execute("COMMIT")
            self.lock.close()
            self.lock = None


@pytest.fixture(params=["sqlite", "postgres"])
def outage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Outage]:
    if request.param == "sqlite":
        out = Outage(Backend("sqlite", {"audit_path": tmp_path / "audit.db"}))
        yield out
        out.start()
        return
    url = request.getfixturevalue("postgres")
    parts = urlsplit(url)
    proxy = Proxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    proxy.start()
    netloc = parts.netloc.rsplit(":", 1)[0] if parts.port else parts.netloc
    via_proxy = urlunsplit(parts._replace(netloc=f"{netloc}:{proxy.port}"))
    for backend in pg_backend(url):
        schema_url = backend.settings["audit_url"]
        backend.settings["audit_url"] = schema_url.replace(url, via_proxy, 1)
        out = Outage(backend, proxy=proxy)
        yield out
        proxy.stop()


async def predict(client: httpx.AsyncClient, route: str = "v1") -> httpx.Response:
    if route == "v2":
        body: dict[str, Any] = {
            "inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": ROW}]
        }
        return await client.post("/v2/models/clf/infer", json=body)
    return await client.post("/v1/models/clf:predict", json={"instances": [ROW]})


async def test_fail_closed_then_recover(outage: Outage, repo: Path) -> None:
    async with serving(repo, audit_queue_size=3, **outage.backend.settings) as (app, client):
        writer = app.state.audit
        assert (await predict(client)).status_code == 200
        assert await writer.flush(10)
        outage.stop()
        codes = [(await predict(client)).status_code for _ in range(3)]
        assert codes == [200, 200, 200]  # held in the queue while the store is down
        refused = await predict(client)
        assert refused.status_code == 503
        body = refused.json()
        assert "audit queue is full" in body["error"] and "fails closed" in body["error"]
        assert body["request_id"] == refused.headers["x-request-id"]
        v2 = await predict(client, "v2")
        assert v2.status_code == 503 and "audit" in v2.json()["error"]
        assert writer.stats.refused == 2 and writer.depth == 3
        text = (await client.get("/metrics")).text
        assert "mcserve_audit_refused_total 2.0" in text
        assert "mcserve_audit_queue 3.0" in text
        outage.start()
        assert await writer.flush(20)
        assert writer.store.count() == 4
        # PostgreSQL: writes failed and were retried; SQLite: the write waited for the lock.
        assert writer.healthy and (writer.stats.store_errors >= 1 or outage.proxy is None)
        assert (await predict(client)).status_code == 200
        text = (await client.get("/metrics")).text
        assert "mcserve_audit_store_up 1.0" in text


async def test_writer_process_killed_loses_nothing(backend: Backend, repo: Path) -> None:
    """The writer process dies with a batch in hand (SIGSTOP, so the batch is surely sent and
    unacknowledged, then SIGKILL): the batch stays queued and goes through a new process."""
    async with serving(repo, **backend.settings) as (app, client):
        writer = app.state.audit
        assert (await predict(client)).status_code == 200
        assert await writer.flush(10)
        sink = writer._sink
        first = sink._proc.pid
        os.kill(first, signal.SIGSTOP)
        codes = [(await predict(client, route)).status_code for route in ("v1", "v2", "v1")]
        assert codes == [200, 200, 200]
        await asyncio.sleep(0.5)  # the 50 ms batching wait, then the batch is sent
        assert writer.depth == 3  # sent, not acknowledged: still queued
        os.kill(first, signal.SIGKILL)
        assert await writer.flush(20)
        assert writer.store.count() == 4
        assert writer.stats.store_errors == 1  # the dead process's batch failed, then was retried
        assert sink._proc.pid != first and writer.healthy
    assert sink._proc is None  # stopped with the server


async def test_fail_open_counts_and_logs(
    outage: Outage, repo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = {"audit_queue_size": 2, "audit_fail_open": True, **outage.backend.settings}
    async with serving(repo, **settings) as (app, client):
        writer = app.state.audit
        outage.stop()
        with caplog.at_level(logging.ERROR, logger="mcserve.audit"):
            codes = [(await predict(client)).status_code for _ in range(5)]
        assert codes == [200] * 5
        assert writer.stats.dropped == 3 and writer.stats.refused == 0
        dropped = [r for r in caplog.records if r.getMessage().startswith("audit record dropped")]
        assert len(dropped) == 3 and all(getattr(r, "request_id", None) for r in dropped)
        text = (await client.get("/metrics")).text
        assert "mcserve_audit_dropped_total 3.0" in text
        # failing open by the operator's choice, the server stays ready (it answers)
        for _ in range(200):  # until a write has failed (SQLite: after its 1 s busy timeout)
            if not writer.healthy:
                break
            await asyncio.sleep(0.05)
        assert not writer.healthy and (await client.get("/readyz")).status_code == 200
        outage.start()
        assert await writer.flush(20)
        assert writer.store.count() == 2


async def test_store_down_at_shutdown_is_reported(
    outage: Outage, repo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = {"audit_flush_timeout_s": 0.5, **outage.backend.settings}
    with caplog.at_level(logging.ERROR, logger="mcserve.audit"):
        async with serving(repo, **settings) as (app, client):
            writer = app.state.audit
            outage.stop()
            assert [(await predict(client)).status_code for _ in range(2)] == [200, 200]
    assert writer.stats.lost_at_exit == 2
    assert any("lost at shutdown" in r.getMessage() for r in caplog.records)


async def test_store_unreachable_at_start_up_stops_the_server(repo: Path) -> None:
    url = "postgresql://nobody@127.0.0.1:1/none"
    with pytest.raises(Exception, match="cannot connect to the audit database"):
        async with serving(repo, audit_url=url):
            pass


async def test_readiness_follows_the_audit_store(outage: Outage, repo: Path) -> None:
    """While records cannot be written the server says it is not ready (a load balancer moves
    on before the queue fills and predictions answer 503), and ready again once they can."""
    async with serving(repo, **outage.backend.settings) as (app, client):
        writer = app.state.audit
        assert (await client.get("/readyz")).status_code == 200
        outage.stop()
        assert (await predict(client)).status_code == 200  # queued; its write fails
        for _ in range(200):  # SQLite: after its 1 s busy timeout; PostgreSQL: at once
            if not writer.healthy:
                break
            await asyncio.sleep(0.05)
        ready = await client.get("/readyz")
        assert ready.status_code == 503
        [reason] = ready.json()["reasons"]
        assert reason.startswith("audit records cannot be written")
        # /readyz is open to anyone: no store, path or database error in its body
        where = str(outage.backend.settings.get("audit_path") or "postgres")
        assert where not in ready.text and "locked" not in ready.text
        v2 = await client.get("/v2/health/ready")
        assert v2.status_code == 503 and "audit records cannot be written" in v2.json()["error"]
        outage.start()
        assert await writer.flush(20)
        assert (await client.get("/readyz")).json() == {"status": "ready"}
        assert (await client.get("/v2/health/ready")).json() == {"ready": True}
