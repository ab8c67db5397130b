"""The audit writer: a bounded in-memory queue, written in batches by one background task.

The request path turns its event into a compact message (`record.message`: plain values and
bytes, a few microseconds) and appends it to the queue (`submit`); the task hands each batch,
pickled on its own thread, to the writer process (`sink.py`), which builds the rows and commits
them in one transaction, outside the server's interpreter. The queue holds no engine objects:
a full queue is about 1.3 kB per record, and nothing young stays alive for the garbage collector
to walk.
A batch leaves the queue only when its commit is acknowledged. A failed write keeps its batch
at the head of the queue and is retried with a backoff (a writer process that died is started
again), so a store that is down for a while loses nothing as long as the queue can hold what
arrives.

The queue is bounded in records and in bytes (a text model's record holds its answer's JSON,
which for 1,024 texts is 1.4 MB: ten thousand of those would not fit in memory), and so is each
batch (one transaction, one pickled message to the writer process). When a record cannot be
queued (the queue is full: the store is down or too slow for longer than the queue can absorb)
the prediction fails closed: `AuditUnavailableError`, answered 503.
With `fail_open` the prediction is answered anyway; the lost record is counted and logged.
`stop` writes out what is queued (within `flush_timeout_s`) before the process exits.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from service.audit.backend import open_store
from service.audit.backlog import BATCH_BYTES, MESSAGE_OVERHEAD, QUEUE_BYTES, Backlog, weight
from service.audit.record import Event, message, replica, software
from service.audit.rows import InputsMode, Message, dumps
from service.audit.sink import SinkClient
from service.audit.store import Store, StoreTimeout
from service.errors import AuditUnavailableError

log = logging.getLogger("mcserve.audit")
STORE_TIMEOUT_S = 5.0  # PostgreSQL: a call stalled this long (x 1.5) fails (postgres.py)
# Unready once the oldest queued record waited this many store timeouts (30 s): it waits for the
# batch in hand and then its own, and a slow but working PostgreSQL may take two calls of 1.5
# timeouts for each (once.py's look-up, the batch). At 2 timeouts (10 s), commits of 6.5 s, each
# within every deadline, took every replica out of its load balancer at once. A stalled writer
# process is also ended, after sink.answer_within.
MAX_WAIT_TIMEOUTS = 6.0


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
        url: str | None,
        path: Path,
        *,
        inputs: InputsMode = "store",
        hmac_key: bytes | None = None,
        queue_size: int = 10_000,
        batch_size: int = 256,
        queue_bytes: int = QUEUE_BYTES,
        batch_bytes: int = BATCH_BYTES,
        store_timeout_s: float | None = None,
        fail_open: bool = False,
        flush_timeout_s: float = 30.0,
        retry_s: tuple[float, float] = (0.05, 2.0),
        linger_s: float = 0.05,
    ) -> None:
        if inputs == "hmac" and not hmac_key:
            raise ValueError("audit_inputs='hmac' needs a key: set audit_hmac_key")
        self.url, self.path = url, path
        self.inputs: InputsMode = inputs
        self.hmac_key = hmac_key
        self.queue_size = queue_size
        self.batch_size = batch_size
        self.queue_bytes = queue_bytes
        self.batch_bytes = batch_bytes
        self.store_timeout_s = store_timeout_s if store_timeout_s is not None else STORE_TIMEOUT_S
        self.max_wait_s = MAX_WAIT_TIMEOUTS * self.store_timeout_s
        self.fail_open = fail_open
        self.flush_timeout_s = flush_timeout_s
        self.retry_s = retry_s
        # Wait this long for a batch to fill: fewer, larger transactions (measured under load,
        # SQLite: about 47 us of the audit thread's CPU per record with 50 ms, 59 us with 10).
        self.linger_s = linger_s
        self.stats = WriterStats()
        self.description = ""  # the store, as the writer process names it (no password)
        self._sink: SinkClient | None = None
        self._store: Store | None = None  # a reading handle, opened when first asked for
        self.healthy = True  # the last write succeeded
        self._queue = Backlog()
        # A batch's bounds now: halved after a timeout (a link too slow to carry a whole batch
        # within the store's timeout would fail it forever), doubled back after each success.
        self._limit = (batch_size, batch_bytes)
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

    @property
    def depth_bytes(self) -> int:
        return self._queue.bytes

    @property
    def store(self) -> Store:
        """The store for reading (CLI-like queries, tests); the writes go through the process."""
        if self._store is None:
            self._store = open_store(self.url, self.path)
        return self._store

    def not_ready_reason(self) -> str | None:
        """Why the server should take no traffic (None: records are being written). Shown on the
        open /readyz: it names no store, path or database error (the log has those). Failing
        open, the server answers without records by the operator's choice: it stays ready
        (replicas sharing a store that is down would otherwise all leave the load balancer)."""
        if self.fail_open:
            return None
        if self._closed:
            return "audit trail closed (shutting down)"
        if not self.healthy:
            return (
                "audit records cannot be written: the audit store's last write failed (retried "
                "until it succeeds; the server log has the error)"
            )
        if self._queue.full(self.queue_size, self.queue_bytes):
            return "audit queue full: predictions are refused until the audit store catches up"
        waited = self._queue.waited()
        if waited > self.max_wait_s:  # a write that neither ends nor fails (sink.py)
            return (
                f"audit records cannot be written: the oldest queued record has waited "
                f"{waited:.0f} s (more than {self.max_wait_s:g} s: the audit store or its writer "
                "is stalled or too slow)"
            )
        return None

    async def start(self) -> None:
        """Start the writer process, which opens and migrates the store (raises when it cannot:
        nothing is served unaudited)."""
        # torch's thread count is per OS thread: read it here, where the server configured it,
        # not on the audit thread (the cache keeps this first reading).
        config = {
            "inputs": self.inputs,
            "hmac_key": self.hmac_key,
            "software": dumps(software()),
            "replica": replica(),
            "store_timeout_s": self.store_timeout_s,
        }
        self._sink = SinkClient(self.url, self.path, config)
        loop = asyncio.get_running_loop()
        self.description = await loop.run_in_executor(self._thread, self._sink.start)
        self._task = loop.create_task(self._run(), name="audit-writer")

    def submit(self, event: Event) -> None:
        """Queue one event; raises `AuditUnavailableError` when it cannot (fail closed)."""
        self.submit_all([event])

    def submit_all(self, events: Sequence[Event]) -> None:
        """Queue every event or none (one call's feedback items: a 503 after some were queued
        recorded them, and the client's retry recorded them again); raises
        `AuditUnavailableError` when it cannot (fail closed). Failing open, as many as fit are
        queued and each one lost is counted (all-or-none would only lose more)."""
        if not events:
            return
        # Before encoding (a full queue costs nothing more): each message weighs at least
        # MESSAGE_OVERHEAD, so a queue full by bytes is seen too (review R12).
        why = self._no_room(len(events), len(events) * MESSAGE_OVERHEAD)
        encoded = None
        if why is None:
            encoded = self._encode(events)
            why = self._no_room(len(encoded), sum(w for _, _, w in encoded))
            if why is None:
                self._append(encoded)
                return
        if not self.fail_open:
            self._refuse(events[0], why)  # raises
            return
        made = {id(e): (e, m, w) for e, m, w in encoded or []}
        for event in events:  # one at a time; each encoded at most once, and only with room
            if encoded is not None and id(event) not in made:
                continue  # it could not be encoded: counted invalid already
            why = self._no_room(1, MESSAGE_OVERHEAD)
            if why is None:
                items = [made[id(event)]] if encoded is not None else self._encode([event])
                if not items:
                    continue  # could not be encoded: counted invalid
                why = self._no_room(1, items[0][2])
                if why is None:
                    self._append(items)
                    continue
            self._refuse(event, why)

    def _encode(self, events: Sequence[Event]) -> list[tuple[Event, Message, int]]:
        out = []
        for event in events:
            try:
                msg = message(event)
            except Exception:  # a bug, not the client's fault: the answer still goes out
                self.stats.invalid += 1
                log.exception("audit event cannot be recorded", extra={"id": event.request_id})
                continue
            out.append((event, msg, weight(msg)))
        return out

    def _no_room(self, n: int, nbytes: int) -> str | None:
        """Why `n` more messages of `nbytes` together cannot be queued (None: they can)."""
        if self._closed:
            return "the audit trail is closed (the server is shutting down)"
        if len(self._queue) + n > self.queue_size:
            return "the audit queue is full (the audit store is down or too slow)"
        over = n > 1 and not len(self._queue) and nbytes > self.queue_bytes  # one only (R12)
        if over or (n and self._queue.full(self.queue_size, self.queue_bytes, nbytes)):
            return (
                f"the audit queue is full ({self._queue.bytes / 2**20:.0f} MiB of records, its "
                "byte bound; the audit store is down or too slow)"
            )
        return None

    def _append(self, encoded: list[tuple[Event, Message, int]]) -> None:
        for _, msg, w in encoded:
            self._queue.append(msg, w)
        self.stats.queued += len(encoded)
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
                if self._sink is not None:
                    self._sink.interrupt()  # a write blocked on the store fails now
                await asyncio.wait({task})
        self._closed = True
        loop = asyncio.get_running_loop()
        if self._sink is not None:
            await loop.run_in_executor(self._thread, self._sink.close)
        if self._store is not None:
            await loop.run_in_executor(self._thread, self._store.close)
            self._store = None
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
            filling = len(self._queue) < self.batch_size and self._queue.bytes < self.batch_bytes
            if self.linger_s and filling and not self._stopping:
                await self._pause(self.linger_s)
            batch = self._queue.head(*self._limit)
            try:
                written = await loop.run_in_executor(self._thread, self._write, batch)
            except Exception as exc:
                self.stats.store_errors += 1
                if isinstance(exc, StoreTimeout):
                    size = sum(weight(m) for m in batch)
                    self._limit = (max(1, len(batch) // 2), max(1, size // 2))
                if self.healthy:
                    log.error(
                        "audit store write failed; retrying (records stay queued)",
                        extra={"error": f"{type(exc).__name__}: {exc}", "queued": self.depth},
                    )
                self.healthy = False
                await self._pause(delay)
                delay = min(delay * 2, 0.2 if self._stopping else self.retry_s[1])
                continue
            self._queue.drop(len(batch))
            n, size = self._limit
            self._limit = (min(self.batch_size, 2 * n), min(self.batch_bytes, 2 * size))
            if not self.healthy:
                log.info("audit store writes resumed", extra={"queued": self.depth})
            self.healthy = True
            delay = self.retry_s[0]
            self.stats.written += written
            self.stats.batches += 1

    def _write(self, batch: list[Message]) -> int:
        """On the audit thread: one commit in the writer process."""
        assert self._sink is not None
        written, invalid = self._sink.write(batch)
        for i, why in invalid:
            self.stats.invalid += 1
            extra = {"id": batch[i].request_id, "error": why}
            log.error("audit event cannot be recorded (not retried)", extra=extra)
        return written
