"""Dynamic batching for one model: a bounded queue, one background task, a future per request.

Shaped like Ray Serve's `@serve.batch`. The queue is bounded in rows (instances x passes); a
request that does not fit is refused at once with an estimate of the drain time. When the compute
worker is idle it takes whatever is queued at once (a timer would only add latency: measured, a
2 ms timer cost 4 ms at concurrency 1); while it computes, requests accumulate into the next
batch, up to a row budget. With the compute process (worker.py) batches form a pipeline instead:
slices of at most `slice_rows` rows, up to four in flight. Expired and cancelled requests are
dropped before compute. One request's failure fails that request only. A request whose passes
would hold the compute longer than `turn_ms` runs in turns, the others in between (turns.py).

A text model with length buckets (buckets.py) counts its work in tokens: a request costs
passes x the sum of its texts' bucket lengths, and every budget above is scaled by max_tokens
(so a text at full length costs one row, as before, and a short one a fraction). What waits, and
in which order a batch takes it (length classes in turn), is the backlog (backlog.py); what a
batch's results do to its requests, the settlement (settlement.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import NoReturn

import numpy as np

from service.engine import cancels, compute, turns
from service.engine.backlog import Backlog, BatcherStats, Queued
from service.engine.compute import Outcome, Work
from service.engine.model import Prediction, ServedModel
from service.engine.params import PredictParams
from service.engine.settlement import Settlement, observe
from service.engine.worker import ComputeProcess
from service.errors import (
    BundleChangedError,
    ComputeUnavailableError,
    OverloadedError,
    PayloadTooLargeError,
    ShuttingDownError,
)

log = logging.getLogger("mcserve.batcher")
SHUTTING_DOWN = "the server is shutting down"
# Deadlines nearer than this get a timer that answers the request 504 when it passes, queued or
# in flight (Backlog.expire); later ones (a client's timeout_ms may be huge) are checked when a
# batch reaches them and by the compute.
TIMER_S = 86_400.0
# A Retry-After past this is a guess, not an estimate: the client asks again by then.
RETRY_AFTER_MAX_S = 120
Clock = Callable[[], float]


class Batcher(Settlement):
    """Queues requests for one model and runs them in batches on a shared compute executor."""

    def __init__(
        self,
        model: ServedModel,
        executor: Executor,
        *,
        max_batch_rows: int = 65536,
        max_queue_rows: int = 2_000_000,
        max_delay_s: float = 0.0,
        batching: bool = True,
        clock: Clock = time.monotonic,
        remote: ComputeProcess | None = None,
        slice_rows: int = 1600,
        turn_ms: float = 1000.0,
    ) -> None:
        self.model = model
        self._executor = executor
        self.remote = remote  # the compute process; None: compute on the executor's thread
        # With the compute process, a pipeline: batches of at most `slice_rows` rows, up to four
        # in flight, so the process always has the next batch while the event loop answers the
        # last. Measured at concurrency 64 (2 cores, T = 100): whole-queue batches left the loop
        # idle a quarter of the time, waiting for the process; slices of 1,600 rows (16 such
        # requests) gave 1.2x the requests/s, slices of 800 less (the per-batch cost). On the
        # thread, one batch: a second would only wait for the same worker.
        self._depth = 4 if remote is not None else 1
        unit = model.cost_unit  # budgets in rows at full size; costs in rows or tokens
        self.unit = unit
        self.slice_rows = (slice_rows if remote is not None else max_batch_rows) * unit
        self._in_flight: set[asyncio.Future[None]] = set()
        self.max_batch_rows = max_batch_rows * unit
        self.max_queue_rows = max_queue_rows * unit
        self.max_delay_s = max_delay_s
        self.turns = turns.Pacer(model, turn_ms / 1000.0, unit)  # long requests in turns
        # Retry-After's rate where no batch reaches turns' MIN_ROWS (MAX_BATCH_ROWS under it):
        # every batch's, averaged; a guess until the first
        self._rows_per_s = 50_000.0 * unit
        self._turn_out = False  # a batch with a turn in it is in flight
        self.batching = batching
        self.clock = clock
        self.stats = BatcherStats()
        self.flags = cancels.shared()  # a client gone during compute stops it (cancels.py)
        self.backlog = Backlog(self.stats)  # one FIFO per length class (one without buckets)
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # The loop, kept at start(): get_running_loop() makes a getpid() system call each time
        # (CPython 3.11 checks for a fork), measured at 4 % of the event loop under load.
        self.loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self._reason = SHUTTING_DOWN  # what the requests it still holds at its stop are told
        self.on_batch: Callable[[int, float], None] | None = None  # (rows, seconds), for metrics
        self.on_result: Callable[[Prediction, int], None] | None = None  # (answer, inputs)
        self.on_changed: Callable[[str], None] | None = None  # (why), its files went

    def start(self) -> None:
        if self._task is None:
            self.loop = asyncio.get_running_loop()
            self._task = self.loop.create_task(self._run(), name="batcher")

    async def stop(
        self, drain: bool = True, settle_s: float = 0.05, reason: str = SHUTTING_DOWN
    ) -> None:
        """Stop; with `drain`, first finish what is queued and what arrives while draining.
        What is left fails with `reason` (503).

        `settle_s` lets requests that resolved this batcher just before it was retired (their
        submit is scheduled, not yet run) still land here instead of failing.
        """
        self._reason = reason  # also what enqueue says from now on, once closed
        if drain:
            await asyncio.sleep(settle_s)
            while (self.backlog or self.stats.queue_rows) and not (
                self._task is None or self._task.done()  # a dead worker drains nothing
            ):
                self._wakeup.set()
                await asyncio.sleep(0.005)
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for task in list(self._in_flight):
            task.cancel()
        await asyncio.gather(*self._in_flight, return_exceptions=True)
        self.backlog.shut(reason)

    @property
    def queued_rows(self) -> int:
        """Rows queued or computing, at full size as batches are counted (a bucketed text
        model's queue counts tokens; the gauge showed them as rows)."""
        return -(-self.stats.queue_rows // self.unit)

    def retry_after_s(self, extra_rows: int = 0) -> int:
        # The compute's rate as turns measure it (batches of MIN_ROWS or more, over the time
        # each had the compute): an average over every batch, tiny ones mostly fixed cost,
        # told clients to wait 15 minutes for a queue that drained in 0.3 s.
        rate = self.turns.rate or self._rows_per_s  # batches under MIN_ROWS: every batch's
        wait = math.ceil((self.stats.queue_rows + extra_rows) / rate)
        return min(max(1, wait), RETRY_AFTER_MAX_S)

    def check_room(self, instances: int, params: PredictParams) -> None:
        """Refuse at once, before its inputs are featurised (WAV files decoded, texts
        tokenized: up to seconds of a worker thread), a request the queue cannot take now even
        at its least cost (each text in the shortest bucket); `enqueue` checks its real cost."""
        least = instances * (params.samples if params.mode == "mc" else 1) * self.model.least_cost
        if least <= self.max_queue_rows and self.stats.queue_rows + least > self.max_queue_rows:
            self._at_capacity(least)

    def _at_capacity(self, rows: int) -> NoReturn:
        self.stats.rejected += 1
        raise OverloadedError(
            f"model '{self.model.name}' is at capacity; retry after the indicated delay",
            retry_after_s=self.retry_after_s(rows),
        )

    async def submit(
        self, x: np.ndarray, params: PredictParams, deadline: float | None = None
    ) -> Prediction:
        """Queue one request and wait for its prediction. Raises McServeError subclasses."""
        return await self.enqueue(x, params, deadline)

    def enqueue(
        self, x: np.ndarray, params: PredictParams, deadline: float | None = None
    ) -> asyncio.Future[Prediction]:
        """Queue one request; its future resolves to the prediction. Cancelling the future (the
        client went away) drops the work before compute. Raises McServeError subclasses."""
        if self._closing:
            if self._reason != SHUTTING_DOWN:  # retired, not the server: said as it is
                raise ShuttingDownError(self._reason)
            raise ShuttingDownError("the server is shutting down; retry on another replica")
        self.model.check_params(params)
        req = flag = None
        if params.mode == "mc":
            # The compute compares the deadline with time.monotonic() (in the compute process
            # too: the clock is system-wide), not this batcher's clock, which tests replace.
            ends = time.monotonic() + deadline - self.clock() if deadline is not None else None
            flag = self.flags.take() if self.flags is not None else None  # cancels.py
            req = self.model.mc_request(x, params, ends, flag)
        rows = self.model.cost(x, req.samples if req is not None else 1)
        most = rows if params.auto is None else self.model.cost(x, params.auto.max_samples)
        if most > self.max_queue_rows:
            raise PayloadTooLargeError(
                f"the request may need {-(-most // self.unit)} rows (instances x samples"
                f"{', at its texts lengths' if self.unit > 1 else ''}), more than the queue "
                f"holds ({self.max_queue_rows // self.unit}); send fewer instances or samples "
                "(max_samples), or raise the server's MCSERVE_MAX_QUEUE_ROWS"
            )
        if self.stats.queue_rows + rows > self.max_queue_rows:
            self._at_capacity(rows)
        fut: asyncio.Future[Prediction] = (self.loop or asyncio.get_running_loop()).create_future()
        if flag is not None and self.flags is not None:  # set when the client goes
            flags = self.flags
            fut.add_done_callback(lambda f: flags.set(flag) if f.cancelled() else None)
        klass = self.model.length_class(x)
        item = Queued(x, params, req, fut, self.clock(), deadline, rows, klass)
        self.turns.start(item)
        self.backlog.push(item)
        if deadline is not None and deadline - item.enqueued < TIMER_S:  # answered on time
            timer = fut.get_loop().call_later(
                max(0.0, deadline - item.enqueued), self.backlog.expire, item
            )
            fut.add_done_callback(lambda _: timer.cancel())
        self.stats.submitted += 1
        self._wakeup.set()
        return fut

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            if self.max_delay_s > 0 and self.backlog:
                # Optional timer batching: wait for the row budget or the oldest's max_delay.
                wait = self.backlog.oldest() + self.max_delay_s - self.clock()
                if wait > 0 and self.backlog.rows() < self.max_batch_rows:
                    await asyncio.sleep(wait)
            while self.backlog and self._may_send():
                limit = min(self.max_batch_rows, self.slice_rows)
                # One turn of a long request in flight at a time: the requests behind it wait
                # for one turn, not one per pipeline slot.
                free = not self._turn_out
                batch = self.backlog.take(limit, self.clock, batching=self.batching, turn=free)
                if not batch:  # nothing live, or only turns while one is in flight
                    break
                self._turn_out = self._turn_out or any(i.turns is not None for i in batch)
                rows = sum(i.batch_rows for i in batch)
                task = asyncio.ensure_future(self._process(batch, rows))
                self._in_flight.add(task)
                task.add_done_callback(self._landed)

    def _may_send(self) -> bool:
        return len(self._in_flight) < self._depth

    def _landed(self, task: asyncio.Future[None]) -> None:
        self._in_flight.discard(task)
        if self.backlog:
            self._wakeup.set()  # what waited for this batch can go now

    async def _process(self, batch: list[Queued], rows: int) -> None:
        """Compute one batch and settle its futures, whatever happens."""
        loop = self.loop or asyncio.get_running_loop()
        start = time.perf_counter()
        try:
            if self.remote is not None:
                results = await self._compute_remote(batch)
            else:
                results = await loop.run_in_executor(self._executor, self._compute, batch)
        except asyncio.CancelledError:  # stopped without draining
            for item in batch:
                self.stats.queue_rows -= item.rows
                if not item.future.done():
                    item.future.set_exception(ShuttingDownError(self._reason))
            raise
        except BundleChangedError as exc:  # a restarted compute process cannot load it
            observe(self.on_changed, exc.message)  # the version is refused (lifecycle.py)
            results = [exc] * len(batch)
        except ComputeUnavailableError as exc:  # it died, or restarts: worker.py said so
            # No traceback kept or logged: its frames held the model, so a version refused
            # meanwhile stayed in memory (a log handler keeps the record).
            results = [exc.with_traceback(None)] * len(batch)
        except Exception as exc:  # never lose the futures, whatever broke
            log.exception("batch failed")
            results = [exc] * len(batch)
        self._deliver(batch, results, start, rows)

    def _compute(self, batch: list[Queued]) -> list[Outcome]:
        """On the compute thread: one shared MC forward, one deterministic call each."""
        out, live = self.backlog.screen(batch, self.clock())
        return _merge(out, live, compute.run(self.model, _works(batch, live)))

    async def _compute_remote(self, batch: list[Queued]) -> list[Outcome]:
        """In the compute process (worker.py): the same work, screened here before it goes."""
        assert self.remote is not None
        out, live = self.backlog.screen(batch, self.clock())
        works = _works(batch, live)
        done = await self.remote.compute(self.model, works) if works else []
        return _merge(out, live, done)


def _works(batch: list[Queued], live: list[int]) -> list[Work]:
    return [turns.work(batch[k]) for k in live]


def _merge(out: list[Outcome | None], live: list[int], done: list[Outcome]) -> list[Outcome]:
    for k, res in zip(live, done, strict=True):
        out[k] = res
    return [o if o is not None else RuntimeError("no result") for o in out]
