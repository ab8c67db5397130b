"""The audit writer: a bounded in-memory queue, written in batches by one background task.

The request path only appends a reference to the queue (`submit`); the task turns events into
rows and writes them, one transaction per batch, on its own thread (the database calls block).
A failed write keeps its batch at the head of the queue and is retried with a backoff, so a
store that is down for a while loses nothing as long as the queue can hold what arrives.

When a record cannot be queued (the queue is full: the store is down or too slow for longer
than the queue can absorb) the prediction fails closed: `AuditUnavailableError`, answered 503.
With `fail_open` the prediction is answered anyway; the lost record is counted and logged.
`stop` writes out what is queued (within `flush_timeout_s`) before the process exits.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from service.audit.record import (
    Event,
    FeedbackEvent,
    InputsMode,
    PredictionEvent,
    feedback_row,
    prediction_row,
    software,
)
from service.audit.store import Store
from service.errors import AuditUnavailableError

log = logging.getLogger("mcserve.audit")


@dataclass
class WriterStats:
    queued: int = 0  # accepted into the queue
    written: int = 0  # committed to the store
    batches: int = 0
    refused: int = 0  # fail-closed: the request was answered 503
    dropped: int = 0  # fail-open: answered without its record
    invalid: int = 0  # an event that could not be turned into a row (a bug): logged, dropped
    store_errors: int = 0  # failed writes (each retried)
    lost_at_exit: int = 0  # still queued when the flush timed out at shutdown


class AuditWriter:
    def __init__(
        self,
        open_store: Callable[[], Store],
        *,
        inputs: InputsMode = "store",
        hmac_key: bytes | None = None,
        queue_size: int = 10_000,
        batch_size: int = 256,
        fail_open: bool = False,
        flush_timeout_s: float = 30.0,
        retry_s: tuple[float, float] = (0.05, 2.0),
        linger_s: float = 0.05,
    ) -> None:
        if inputs == "hmac" and not hmac_key:
            raise ValueError("audit_inputs='hmac' needs a key: set audit_hmac_key")
        self._open_store = open_store
        self.inputs: InputsMode = inputs
        self.hmac_key = hmac_key
        self.queue_size = queue_size
        self.batch_size = batch_size
        self.fail_open = fail_open
        self.flush_timeout_s = flush_timeout_s
        self.retry_s = retry_s
        # Wait this long for a batch to fill: fewer, larger transactions (measured under load,
        # SQLite: about 47 us of the audit thread's CPU per record with 50 ms, 59 us with 10).
        self.linger_s = linger_s
        self.stats = WriterStats()
        self.store: Store | None = None
        self.healthy = True  # the last write succeeded
        self._queue: deque[Event] = deque()
        self._wake = asyncio.Event()  # something was queued
        self._kick = asyncio.Event()  # stop: end a retry backoff now
        self._stopping = False
        self._abandon = False  # the flush timed out: give up
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mcserve-audit")

    @property
    def depth(self) -> int:
        return len(self._queue)

    async def start(self) -> None:
        """Open and migrate the store (raises when it cannot: nothing is served unaudited)."""
        # torch's thread count is per OS thread: read it here, where the server configured it,
        # not on the audit thread (the cache keeps this first reading).
        software()
        loop = asyncio.get_running_loop()
        self.store = await loop.run_in_executor(self._thread, self._open)
        self._task = loop.create_task(self._run(), name="audit-writer")

    def _open(self) -> Store:
        store = self._open_store()
        try:
            store.migrate()
        except BaseException:
            store.close()
            raise
        return store

    def submit(self, event: Event) -> None:
        """Queue one event; raises `AuditUnavailableError` when it cannot (fail closed)."""
        if self._closed:
            self._refuse(event, "the audit trail is closed (the server is shutting down)")
        elif len(self._queue) >= self.queue_size:
            why = "the audit queue is full (the audit store is down or too slow)"
            self._refuse(event, why)
        else:
            self._queue.append(event)
            self.stats.queued += 1
            self._wake.set()

    def _refuse(self, event: Event, why: str) -> None:
        extra = {"request_id": event.request_id, "reason": why, "queued": len(self._queue)}
        if self.fail_open:
            self.stats.dropped += 1
            log.error("audit record dropped (audit_fail_open)", extra=extra)
            return
        self.stats.refused += 1
        log.warning("prediction refused: no audit record", extra=extra)
        raise AuditUnavailableError(
            f"{why}; the prediction was not returned because it could not be recorded "
            "(audit fails closed); retry later"
        )

    async def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until everything queued so far is written; False on timeout."""
        deadline = time.monotonic() + (timeout_s if timeout_s is not None else 1e9)
        while self._queue:
            if time.monotonic() >= deadline:
                return False
            self._wake.set()
            await asyncio.sleep(0.005)
        return True

    async def stop(self) -> None:
        """Write out the queue (within `flush_timeout_s`), then close the store."""
        self._stopping = True
        self._kick.set()  # cut a retry backoff short
        self._wake.set()
        task, self._task = self._task, None
        if task is not None:
            done, _ = await asyncio.wait({task}, timeout=self.flush_timeout_s)
            if not done:
                self._closed = True
                self.stats.lost_at_exit = len(self._queue)
                log.error(
                    "audit records lost at shutdown: the store did not take them in time",
                    extra={"lost": len(self._queue), "flush_timeout_s": self.flush_timeout_s},
                )
                self._abandon = True  # the loop ends after its current store call
                self._kick.set()
                await asyncio.wait({task})
        self._closed = True
        if self.store is not None:
            await asyncio.get_running_loop().run_in_executor(self._thread, self.store.close)
            self.store = None
        self._thread.shutdown(wait=True)

    async def _pause(self, seconds: float) -> None:
        """Wait before a retry (or for a batch to fill); `stop` cuts the wait short."""
        if self._stopping:
            seconds = min(seconds, 0.2)
        self._kick.clear()
        kicked = asyncio.ensure_future(self._kick.wait())
        try:
            await asyncio.wait({kicked}, timeout=seconds)
        finally:
            kicked.cancel()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        delay = self.retry_s[0]
        while not self._abandon:
            if not self._queue:
                if self._stopping:
                    self._closed = True  # in the same step as the check: nothing slips in
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            if self.linger_s and len(self._queue) < self.batch_size and not self._stopping:
                await self._pause(self.linger_s)
            batch = list(itertools.islice(self._queue, self.batch_size))
            try:
                written = await loop.run_in_executor(self._thread, self._write, batch)
            except Exception as exc:
                self.stats.store_errors += 1
                if self.healthy:
                    log.error(
                        "audit store write failed; retrying (records stay queued)",
                        extra={"error": f"{type(exc).__name__}: {exc}", "queued": self.depth},
                    )
                self.healthy = False
                await self._pause(delay)
                delay = min(delay * 2, 0.2 if self._stopping else self.retry_s[1])
                continue
            for _ in batch:
                self._queue.popleft()
            if not self.healthy:
                log.info("audit store writes resumed", extra={"queued": self.depth})
            self.healthy = True
            delay = self.retry_s[0]
            self.stats.written += written
            self.stats.batches += 1

    def _write(self, batch: list[Event]) -> int:
        """On the audit thread: rows (built once per event, kept across retries), one commit."""
        records: list[dict[str, Any]] = []
        feedback: list[dict[str, Any]] = []
        for e in batch:
            if e.row is None:
                try:
                    if isinstance(e, PredictionEvent):
                        e.row = prediction_row(e, self.inputs, self.hmac_key)
                    else:
                        e.row = feedback_row(e)
                except Exception:
                    self.stats.invalid += 1
                    log.exception("audit event cannot be recorded", extra={"id": e.request_id})
                    e.row = {}
            if not e.row:
                continue
            (feedback if isinstance(e, FeedbackEvent) else records).append(e.row)
        assert self.store is not None
        self.store.append(records, feedback)
        return len(records) + len(feedback)
