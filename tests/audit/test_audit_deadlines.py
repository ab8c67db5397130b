"""PostgreSQL deadlines without their side effects: a COMMIT whose answer was lost is not written
twice, a batch a slow link cannot carry in time is split, and PGOPTIONS is honoured."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import numpy as np
import psycopg
import pytest
from audit_pg import with_schema
from audit_proxy import Proxy
from audit_support import Backend, execute

from service.audit.arrays import layout
from service.audit.backlog import weight
from service.audit.postgres import PostgresStore
from service.audit.rows import PredictionMessage, RowContext, row
from service.audit.store import StoreError
from service.audit.writer import AuditWriter

CTX = RowContext("store", None, "{}", "replica-1")


def message(request_id: str, answer_bytes: int = 16) -> PredictionMessage:
    summary = b'{"predictions":[{"x":"' + b"a" * answer_bytes + b'"}]}'
    return PredictionMessage(
        time.time(), request_id, "/v1", None, "m", "1", "sha256:0", "torch", "cpu", "mc", 10, 1,
        {"samples": 10}, 1, b"\0" * 4, layout(np.dtype("float32"), (1, 1)), summary, None,
    )  # fmt: skip


def values(request_id: str) -> dict[str, object]:
    return row(message(request_id), CTX)[1]


def counts(backend: Backend, ids: list[str]) -> list[int]:
    sql = "SELECT count(*) FROM audit_records WHERE request_id = '{}'"
    return [int(execute(backend, sql.format(i))) for i in ids]


def test_a_commit_whose_answer_was_lost_is_not_written_again(
    via_proxy: tuple[Backend, Proxy],
) -> None:
    backend, proxy = via_proxy
    a, b, c = values("a"), values("b"), values("c")
    with PostgresStore(backend.settings["audit_url"], timeout_s=0.5) as store:
        store.migrate()
        proxy.freeze_on = b"COMMIT"  # the server commits; its answer never comes
        with pytest.raises(StoreError, match="did not answer"):
            store.append([a, b], [])
        proxy.thaw()
        # The writer's retry: after a timeout, the first half of the batch, then the rest.
        assert store.append([a], []) == []
        assert store.append([b, c], []) == []
        assert store.append([c], []) == []  # the queue moved on: a new row is written
    # Before: the retry committed the rows again (a: 2 rows, b: 2 rows).
    assert counts(backend, ["a", "b", "c"]) == [1, 1, 2]


async def test_a_batch_a_slow_link_cannot_carry_in_time_is_split(
    via_proxy: tuple[Backend, Proxy], tmp_path: Path
) -> None:
    backend, proxy = via_proxy
    writer = AuditWriter(
        backend.settings["audit_url"], tmp_path / "unused.db", store_timeout_s=0.5,
        retry_s=(0.01, 0.1), linger_s=0,
    )  # fmt: skip
    await writer.start()
    ids = [f"slow-{i}" for i in range(8)]
    try:
        proxy.rate = 128 * 1024  # bytes/s: one 16 kB record in 0.13 s, all 8 in 1 s
        for i in ids:  # queued together: one batch
            msg = message(i, 16 * 1024)
            writer._queue.append(msg, weight(msg))
        writer._wake.set()
        # Before: the whole batch was retried, and timed out, forever.
        assert await writer.flush(20), "a batch too large for the link was never written"
        assert writer.stats.store_errors > 0 and writer.stats.batches > 1
    finally:
        proxy.rate = None
        await writer.stop()
    assert counts(backend, ids) == [1] * len(ids)


def test_pgoptions_from_the_environment_is_honoured(
    postgres: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        monkeypatch.setenv("PGOPTIONS", f"-c search_path={schema}")
        with PostgresStore(postgres, timeout_s=2.5) as store:
            [path] = store._query("SHOW search_path", ())
            [timeout] = store._query("SHOW statement_timeout", ())
        # Before: the options the store passed replaced PGOPTIONS (search_path "$user", public).
        assert path["search_path"] == schema and timeout["statement_timeout"] == "2500ms"
        # The URL's own options win over PGOPTIONS, as with libpq alone.
        with PostgresStore(with_schema(postgres, "public"), timeout_s=2.5) as store:
            assert store._query("SHOW search_path", ()) == [{"search_path": "public"}]
    finally:
        with psycopg.connect(postgres, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")
