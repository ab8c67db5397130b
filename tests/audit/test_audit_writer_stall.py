"""A writer process that stops making progress (stopped here; a SQLite file on a disk or mount
that hangs blocks the same way: sqlite3 has no deadline). Before: never noticed, readiness 200
while the records piled up in memory, where a crash loses them. Now readiness fails once the
oldest record has waited too long, and a process that gives no answer within its deadline is
killed and restarted: nothing is lost, nothing written twice."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from audit_support import serving

import service.audit.sink as sink_module
import service.audit.writer as writer_module
from service.audit.sink import answer_within


@contextlib.contextmanager
def stopped(proc: Any) -> Iterator[None]:
    """The writer process stopped (SIGSTOP) inside the block, continued after if still there."""
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)


BODY = {"instances": [[0.1, -0.2, 0.3, 0.4]], "parameters": {"seed": 1}}


async def test_a_writer_process_without_an_answer_is_killed_and_the_batch_written_once(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sink_module, "answer_within", lambda timeout_s, nbytes: 1.0)
    async with serving(repo, audit_path=tmp_path / "a.db", audit_flush_timeout_s=2) as (
        app,
        client,
    ):
        writer = app.state.audit
        assert (await client.post("/v1/models/clf:predict", json=BODY)).status_code == 200
        assert await writer.flush(10)
        stalled = writer._sink._proc
        with stopped(stalled):
            for i in range(3):
                r = await client.post(
                    "/v1/models/clf:predict", json=BODY, headers={"X-Request-ID": f"s-{i}"}
                )
                assert r.status_code == 200
            # Before: the write waited for the stopped process forever (flush timed out).
            assert await writer.flush(10), "a writer process without an answer was never noticed"
        assert stalled.poll() == -signal.SIGKILL  # killed at its deadline
        assert writer._sink._proc is not stalled and writer._sink.alive  # a new one wrote
        assert writer.stats.store_errors >= 1 and writer.healthy
        assert writer.store.count() == 4  # nothing lost, nothing twice
        assert [len(writer.store.find(f"s-{i}")) for i in range(3)] == [1, 1, 1]


async def test_readiness_fails_while_the_oldest_record_waits_too_long(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writer_module, "STORE_TIMEOUT_S", 0.25)  # records may wait 1.5 s
    async with serving(repo, audit_path=tmp_path / "a.db") as (app, client):
        writer = app.state.audit
        assert (await client.post("/v1/models/clf:predict", json=BODY)).status_code == 200
        assert await writer.flush(10)
        proc = writer._sink._proc
        with stopped(proc):
            assert (await client.post("/v1/models/clf:predict", json=BODY)).status_code == 200
            await asyncio.sleep(0.8)
            assert (await client.get("/readyz")).status_code == 200  # slow is not stalled
            await asyncio.sleep(1.0)
            ready = await client.get("/readyz")
            assert ready.status_code == 503, ready.text  # was 200: the stall went unnoticed
            [reason] = ready.json()["reasons"]
            assert reason.startswith("audit records cannot be written: the oldest queued record")
            assert writer.healthy  # no write failed yet: only the record's age tells
        assert await writer.flush(10)
        assert (await client.get("/readyz")).status_code == 200
        assert writer.store.count() == 2 and writer._sink._proc is proc  # the same process


def test_the_deadline_outlasts_the_stores_own() -> None:
    """Longer than the PostgreSQL store's own deadlines add up to (once.py's look-up, the batch
    and the batch again in parts: 1.5 times the timeout each), so that the store, not a kill,
    ends a slow call and once.py keeps a lost commit from being written twice."""
    assert answer_within(5.0, 0) > 5.0 + 3 * 1.5 * 5.0
    assert answer_within(5.0, 16 * 2**20) == answer_within(5.0, 0) + 16  # 1 s per MiB
