"""A PostgreSQL path that stalls (a proxy that stops forwarding but keeps its connections, as a
NAT or a hung proxy does): the write fails within its deadline, the store is marked down and
readiness says so; nothing is lost once the path forwards again."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from audit_proxy import Proxy
from audit_support import Backend, pg_backend, serving

import service.audit.writer as writer_module
from service.audit.postgres import PostgresStore, timeouts
from service.audit.store import SCHEMA_VERSION

ROW = [0.1, -0.2, 0.3, 0.4]
TIMEOUT_S = 1.0  # the store's timeout in these tests: a stalled call fails after 1.5 s


async def test_a_stalled_connection_fails_the_write_and_readiness(
    via_proxy: tuple[Backend, Proxy], repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend, proxy = via_proxy
    monkeypatch.setattr(writer_module, "STORE_TIMEOUT_S", TIMEOUT_S)
    body = {"instances": [ROW], "parameters": {"seed": 1}}
    async with serving(repo, audit_flush_timeout_s=5, **backend.settings) as (app, client):
        writer = app.state.audit
        assert (await client.post("/v1/models/clf:predict", json=body)).status_code == 200
        assert await writer.flush(10)
        proxy.freeze()
        assert (await client.post("/v1/models/clf:predict", json=body)).status_code == 200
        t0 = time.monotonic()
        while writer.healthy and time.monotonic() - t0 < 15:
            await asyncio.sleep(0.1)
        waited = time.monotonic() - t0
        # Without a deadline the write waited forever, the store counted up (seen: 12 s and on).
        assert not writer.healthy, "a stalled write was never noticed"
        # The deadline, plus the batching wait and slack for a busy machine (the bug: never;
        # the loop above gives up at 15 s)
        assert waited < 1.5 * TIMEOUT_S + 8
        ready = await client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["reasons"][0].startswith("audit records cannot be written")
        assert "mcserve_audit_store_up 0.0" in (await client.get("/metrics")).text
        proxy.thaw()
        assert await writer.flush(30)
        assert writer.healthy and (await client.get("/readyz")).status_code == 200
        assert writer.store.count() == 2


def test_the_connection_has_timeouts_and_keeps_the_urls_own(postgres: str) -> None:
    for backend in pg_backend(postgres):
        url = backend.settings["audit_url"]
        with PostgresStore(url, timeout_s=2.5) as store:
            [row] = store._query("SHOW statement_timeout", ())
            assert row["statement_timeout"] == "2500ms"
            # The URL's search_path (its own options) survives the added statement_timeout.
            assert store.migrate() == SCHEMA_VERSION and store.count() == 0
        own = url.replace("options=", "options=-cstatement_timeout%3D7s%20", 1)
        with PostgresStore(own, timeout_s=2.5) as store:
            [row] = store._query("SHOW statement_timeout", ())
            assert row["statement_timeout"] == "7s"
    params = timeouts("postgresql://u@h/db?keepalives_idle=30", 5.0)
    assert "keepalives_idle" not in params  # the URL's own value is kept
    assert params["tcp_user_timeout"] == 5000 and params["keepalives"] == 1
    assert params["options"] == "-c statement_timeout=5000"
