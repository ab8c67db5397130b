"""The writer process on its own: start-up errors, a malformed message, close."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from audit_support import serving

import service.audit.writer as writer_module
from service.audit.arrays import layout
from service.audit.rows import FeedbackMessage, PredictionMessage
from service.audit.sink import SinkClient
from service.audit.sqlite import SqliteStore
from service.audit.store import StoreError

CTX = {"inputs": "store", "hmac_key": None, "software": "{}", "replica": "test-host"}


def test_malformed_message_is_reported_and_the_rest_written(tmp_path: Path) -> None:
    sink = SinkClient(None, tmp_path / "a.db", CTX)
    assert sink.start() == f"sqlite:{tmp_path / 'a.db'}"
    feedback = FeedbackMessage(time.time(), "card-1", "accepted", None, None, "svc", "req-1", "iss")
    written, invalid = sink.write([("p", "too", "short"), feedback])  # type: ignore[list-item]
    assert written == 1
    [(index, why)] = invalid
    assert index == 0 and "ValueError" in why  # not an audit message
    proc = sink._proc
    sink.close()
    assert proc is not None and proc.returncode == 0 and sink._proc is None
    with SqliteStore(tmp_path / "a.db") as store:
        assert store.count("audit_feedback") == 1 and store.count() == 0
        [row] = store.feedback("card-1")
    assert (row["outcome"], row["replica"], row["caller"]) == ("accepted", "test-host", "iss")


def test_ids_follow_the_commits_not_the_time(tmp_path: Path) -> None:
    """docs/AUDIT.md: `id` is in commit order. A record answered earlier can be committed later
    (another replica's queue, held while its link was down; a clock step): a time range is not
    an id range, query `recorded_at` for time."""
    x = np.zeros((1, 4), dtype="<f4")
    now = time.time()

    def answered(at: float, rid: str) -> PredictionMessage:
        summary = b'{"predictions":[{"referral":null}]}'
        return PredictionMessage(at, rid, "/v1/models/{name}:predict", None, "clf", "1",
                                 "sha256:0", "torch", "cpu", "deterministic", None, None, {}, 1,
                                 x.tobytes(), layout(x.dtype, x.shape), summary, None)  # fmt: skip

    sink = SinkClient(None, tmp_path / "a.db", CTX)
    sink.start()
    assert sink.write([answered(now, "later")]) == (1, [])
    assert sink.write([answered(now - 60, "earlier")]) == (1, [])
    sink.close()
    with SqliteStore(tmp_path / "a.db") as store:
        [later], [earlier] = store.find("later"), store.find("earlier")
    assert earlier.id > later.id and earlier.recorded_at < later.recorded_at


def test_start_up_failure_is_the_stores_message(tmp_path: Path) -> None:
    sink = SinkClient("postgresql://nobody@127.0.0.1:1/none", tmp_path / "unused.db", CTX)
    with pytest.raises(StoreError, match="cannot connect to the audit database"):
        sink.start()
    assert sink._proc is None  # nothing left running


async def test_event_that_cannot_be_described_is_logged_not_fatal(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug in describing one prediction for the audit (the message) is logged and counted; the
    client still gets its answer and the next prediction is recorded."""
    real = writer_module.message
    calls = {"n": 0}

    def flaky(event: object) -> tuple[object, ...]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return real(event)  # type: ignore[arg-type]

    monkeypatch.setattr(writer_module, "message", flaky)
    body = {"instances": [[0.1, -0.2, 0.3, 0.4]]}
    async with serving(repo, audit_path=tmp_path / "a.db") as (app, client):
        r1 = await client.post("/v1/models/clf:predict", json=body, headers={"X-Request-ID": "a"})
        r2 = await client.post("/v1/models/clf:predict", json=body, headers={"X-Request-ID": "b"})
        assert (r1.status_code, r2.status_code) == (200, 200)
        writer = app.state.audit
        assert await writer.flush(10)
        assert writer.stats.invalid == 1 and writer.stats.written == 1
        assert [rec.request_id for rec in writer.store.find("b")] == ["b"]
        assert writer.store.find("a") == []
    logged = [r for r in caplog.records if r.getMessage() == "audit event cannot be recorded"]
    assert len(logged) == 1 and getattr(logged[0], "id", None) == "a"
