"""Replay and card memory shared by replicas, in the PostgreSQL the audit trail uses.

With `audit_url` set, every replica also records each accepted token's (iss, jti) until it
expires and each issued card, in two tables of that database (created on first use, under an
advisory lock). A token seen by any replica is then refused by all (not once per replica), and
feedback reaches any replica. The per-replica memories stay in front (a replay on the same
replica costs no query).

Failures: when the database cannot be reached, tokens are refused (fail closed, as the local
memory does when full) and cards are still issued (feedback may then 404 elsewhere). Rows are
purged once expired (tokens) or after `card_days` (cards), every `PURGE_EVERY` writes.

One deadline covers waiting for the connection and using it: behind a stalled connection (a
partition, a failover) calls waited in single file, 5 s each, the sixth for 40 s (review SO).
After a failure calls fail at once for `PAUSE_S`, and the broken connection is closed aside.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Coroutine
from dataclasses import astuple
from typing import Any, TypeVar

import psycopg

from service.clinical.ledger import Record

log = logging.getLogger("mcserve.cds")
LOCK = 0x6D63_6364  # advisory lock key for the schema ("mccd")
T = TypeVar("T")
PURGE_EVERY = 1000
PAUSE_S = 2.0  # after a failure: calls fail at once, not each after its own timeout
SCHEMA = """
CREATE TABLE IF NOT EXISTS mcserve_cds_jti (
    iss TEXT NOT NULL, jti TEXT NOT NULL, until DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (iss, jti));
CREATE TABLE IF NOT EXISTS mcserve_cds_cards (
    card TEXT PRIMARY KEY, service TEXT NOT NULL, suggestion TEXT NOT NULL, model TEXT NOT NULL,
    version TEXT NOT NULL, digest TEXT NOT NULL, hook_instance TEXT NOT NULL,
    referred BOOLEAN NOT NULL, issued DOUBLE PRECISION NOT NULL);
"""
FIRST_USE = """
INSERT INTO mcserve_cds_jti AS t (iss, jti, until) VALUES (%s, %s, %s)
ON CONFLICT (iss, jti) DO UPDATE SET until = EXCLUDED.until WHERE t.until < %s
RETURNING 1
"""
CARD_COLUMNS = "card, service, suggestion, model, version, digest, hook_instance, referred"


class SharedUnavailable(Exception):
    """The memory cannot answer now; `retry_after_s`: when asking again may succeed (the pause)."""

    def __init__(self, why: str, retry_after_s: float = PAUSE_S) -> None:
        super().__init__(why)
        self.retry_after_s = retry_after_s


class SharedMemory:
    def __init__(self, url: str, card_days: float = 30.0, timeout_s: float = 5.0) -> None:
        self.url = url
        self.card_days = card_days
        self.timeout_s = timeout_s
        self._conn: psycopg.AsyncConnection | None = None
        self._lock = asyncio.Lock()  # one connection, one statement at a time
        self._writes = 0
        self._down_until = 0.0  # monotonic: until then, fail at once
        self._why = ""
        self._tasks: set[asyncio.Task[Any]] = set()  # set-ups and statements under way
        self._closed = False  # close() ran: calls are refused, no connection is opened

    async def _open(self) -> psycopg.AsyncConnection:
        """A new connection with the tables made; one that fails on the way is finished."""
        conn = await psycopg.AsyncConnection.connect(
            self.url, autocommit=True, connect_timeout=int(self.timeout_s)
        )
        try:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK,))
                await conn.execute(SCHEMA)
        except BaseException:
            conn.pgconn.finish()
            raise
        return conn

    async def _run(self, sql: str, params: tuple[object, ...]) -> list[tuple[object, ...]]:
        if time.monotonic() < self._down_until:
            raise SharedUnavailable(
                f"{self._why} (a moment ago; retrying after a pause)",
                math.ceil(self._down_until - time.monotonic()),  # whole seconds, not less
            )
        conn = opening = work = None
        try:
            async with asyncio.timeout(self.timeout_s), self._lock:  # the wait counts too
                if self._closed:
                    raise SharedUnavailable("shut down")
                # Each step shielded: cancelled at the deadline, psycopg cancels a statement on
                # the server and waits up to 10 s for it over the stalled path (the set-up's
                # too). The step is cancelled aside instead (a connection opened late is
                # finished, the one in use closed once its statement has ended: closing it
                # under a running statement crashed the process) and the caller answered now.
                if self._conn is None or self._conn.closed:
                    opening = self._aside(self._open())
                    self._conn = await asyncio.shield(opening)
                conn = self._conn
                work = self._aside(_query(conn, sql, params))
                return await asyncio.shield(work)
        except psycopg.OperationalError as exc:  # the link or the server: pause, reconnect
            self._failed(exc, conn, work)
            raise SharedUnavailable(self._why) from None
        except TimeoutError as exc:
            if opening is not None and conn is None:  # a late connection is not kept
                opening.add_done_callback(_finish_opened)
                opening.cancel()
            self._failed(exc, conn, work)
            raise SharedUnavailable(self._why) from None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():  # the caller cancelled: drop its step,
                if opening is not None and conn is None:  # not leave it running on the
                    opening.add_done_callback(_finish_opened)  # connection the next call takes
                    opening.cancel()
                running = work is not None and not work.done()
                if work is not None and running and conn is not None and conn is self._conn:
                    self._conn = None
                    work.add_done_callback(lambda _: _finish(conn))
                    work.cancel()
                raise
            raise SharedUnavailable("shut down") from None  # a step close() cancelled
        except psycopg.Error as exc:  # one statement's (a value it cannot hold): not the link
            raise SharedUnavailable(f"{type(exc).__name__}: {exc}") from None

    def _aside(self, step: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """`step` as a task this memory keeps until it ends (its error read, not logged)."""
        task = asyncio.get_running_loop().create_task(step)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_retrieved)
        return task

    def _failed(
        self,
        exc: BaseException,
        conn: psycopg.AsyncConnection | None,
        work: asyncio.Task[Any] | None,
    ) -> None:
        """Pause, and close the connection in use aside (unless another call opened one)."""
        self._why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        self._down_until = time.monotonic() + PAUSE_S
        if conn is None or conn is not self._conn:
            return
        self._conn = None
        if work is not None and not work.done():
            # Closed once its statement has ended (psycopg's own cancelling, at most about
            # 10 s): closing it under a running statement crashed the process.
            work.add_done_callback(lambda _: _finish(conn))
            work.cancel()
        else:
            _finish(conn)

    async def _purge(self, now: float) -> None:
        self._writes += 1
        if self._writes % PURGE_EVERY:
            return
        await self._run("DELETE FROM mcserve_cds_jti WHERE until < %s", (now,))
        old = now - self.card_days * 86400
        await self._run("DELETE FROM mcserve_cds_cards WHERE issued < %s", (old,))

    async def first_use(self, iss: str, jti: str, until: float, now: float) -> bool:
        """Whether no replica has accepted (iss, jti) before (records it until `until`)."""
        rows = await self._run(FIRST_USE, (iss, jti, until, now))
        await self._purge(now)
        return bool(rows)

    async def issue(self, record: Record, now: float) -> None:
        try:
            await self._run(
                f"INSERT INTO mcserve_cds_cards ({CARD_COLUMNS}, issued) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (card) DO NOTHING",
                (*astuple(record), now),
            )
            await self._purge(now)
        except SharedUnavailable as exc:  # the card is still issued; feedback may 404 elsewhere
            log.warning("shared card memory unavailable", extra={"reason": str(exc)})

    async def card(self, card: str) -> Record | None:
        try:
            rows = await self._run(
                f"SELECT {CARD_COLUMNS} FROM mcserve_cds_cards WHERE card = %s", (card,)
            )
        except SharedUnavailable as exc:
            log.warning("shared card memory unavailable", extra={"reason": str(exc)})
            return None
        if not rows:
            return None
        c, service, suggestion, model, version, digest, hook, referred = rows[0]
        return Record(
            str(c), str(service), str(suggestion), str(model), str(version), str(digest),
            str(hook), bool(referred),
        )  # fmt: skip

    async def close(self) -> None:
        """At shutdown: what is left aside cancelled and ended, then the connection closed."""
        self._closed = True
        while self._tasks:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._conn is not None:
            conn, self._conn = self._conn, None
            _finish(conn)


async def _query(
    conn: psycopg.AsyncConnection, sql: str, params: tuple[object, ...]
) -> list[tuple[object, ...]]:
    cur = await conn.execute(sql, params)
    return await cur.fetchall() if cur.description else []


def _retrieved(task: asyncio.Future[Any]) -> None:
    """A query left at its deadline ends with an error no one awaits: read, not logged."""
    if not task.cancelled():
        task.exception()


def _finish_opened(task: asyncio.Future[Any]) -> None:
    """A connection whose set-up outlived its caller's deadline: finished, never used."""
    if not task.cancelled() and task.exception() is None:
        _finish(task.result())


def _finish(conn: psycopg.AsyncConnection) -> None:
    """Close at once, without a round trip (its socket may be stalled); no statement runs."""
    with contextlib.suppress(Exception):
        conn.pgconn.finish()
