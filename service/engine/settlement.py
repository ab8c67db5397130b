"""What a computed batch's results do to its requests: answered, failed, or queued again.

A result is an answer (timed and counted), an error (the request's alone), the next turn of a
long request (turns.py), or more passes for an unsettled adaptive one: both go back to the
queue. The batcher (batcher.py) mixes this in; it owns the queue and the loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable

from service.engine import compute, turns
from service.engine.backlog import Backlog, BatcherStats, Queued, late
from service.engine.compute import More, Outcome, Part
from service.engine.model import Prediction, ServedModel
from service.errors import DeadlineExceededError

log = logging.getLogger("mcserve.batcher")


class Settlement:
    """The batcher's side that settles futures; the attributes are the batcher's own."""

    model: ServedModel
    unit: int
    stats: BatcherStats
    backlog: Backlog
    turns: turns.Pacer
    _wakeup: asyncio.Event
    _turn_out: bool
    _rows_per_s: float
    on_batch: Callable[[int, float], None] | None
    on_result: Callable[[Prediction, int], None] | None

    def _deliver(
        self, batch: list[Queued], results: list[Outcome], start: float, rows: int
    ) -> None:
        if any(i.turns is not None for i in batch):
            self._turn_out = False  # the next turn may go
        now = time.perf_counter()
        elapsed = max(now - start, 1e-6)
        self.turns.landed(rows, results, start, now)
        self._rows_per_s = 0.8 * self._rows_per_s + 0.2 * (rows / elapsed)
        rows_out = -(-rows // self.unit)  # metrics and logs count rows at full size
        self.stats.batches += 1
        self.stats.batch_rows = [*self.stats.batch_rows[-99:], rows_out]
        observe(self.on_batch, rows_out, elapsed)
        for item, res in zip(batch, results, strict=True):
            self.stats.queue_rows -= item.rows
            if item.future.done():  # its client went, or its deadline's timer answered it
                self.stats.cancelled += not item.timed_out
                continue
            if isinstance(res, More):
                item.chunks_s += elapsed + (item.turns.compute_s if item.turns is not None else 0)
                self._again(item, res.samples)
                continue
            if isinstance(res, Part):  # a turn of a long request: queue its next one
                failed = self._next_turn(item, res, elapsed)
                if failed is None:
                    continue
                res = failed
            if isinstance(res, BaseException):
                if isinstance(res, DeadlineExceededError):  # screened, or stopped in compute
                    self.stats.expired += 1
                    if res.what == compute.STOPPED:
                        res = late(item, compute.STOPPED)
                else:
                    self.stats.failed += 1
                item.future.set_exception(res)
                continue
            # Its other turns and chunks: compute, not waiting (an adaptive request's earlier
            # chunks were counted as queueing: 18.8 of 21.9 ms on an idle server).
            earlier = item.chunks_s + (item.turns.compute_s if item.turns is not None else 0.0)
            res.timing = {
                "queue_s": max(0.0, start - item.queued_at - earlier),
                "compute_s": elapsed + earlier,
                "batch_rows": float(rows_out),
            }
            observe(self.on_result, res, int(item.x.shape[0]))
            self.stats.completed += 1
            item.future.set_result(res)

    def _next_turn(self, item: Queued, part: Part, seconds: float) -> BaseException | None:
        """Queue a request's next turn (None), or return why it could not be."""
        try:
            assert item.turns is not None
            item.turns.add(part.samples, seconds)
            self.turns.cut(item)
        except Exception as exc:  # never an unsettled future
            log.exception("the next turn of a request failed")
            return exc
        self.stats.turns += 1
        self.backlog.push(item)
        self._wakeup.set()
        return None

    def _again(self, item: Queued, samples: int) -> None:
        """Queue an unsettled adaptive request again, with more passes, at the back.

        Why chunk by chunk through the queue rather than all chunks in one compute call: a hard
        input runs up to max_samples passes (1,000 by default), 30 times a first chunk; in one
        call it would hold its batch's slot, and every request behind it, for all of them. Back
        in the queue, the requests that arrived meanwhile go first, and each chunk shares its
        forward with them. It stays stateless: a chunk starts again at pass 0 (masks are a
        function of seed and pass, so its first passes are the last chunk's, bit for bit) and
        nothing is kept between chunks but the seed; doubling keeps the repeated work under
        the final pass count. Admitted once, it is not refused for queue room later; its
        deadline still holds (504), and a client that goes away drops it.
        """
        assert item.req is not None
        item.params = dataclasses.replace(item.params, samples=samples)
        item.req = dataclasses.replace(item.req, samples=samples, first=0)
        item.rows = self.model.cost(item.x, samples)
        self.turns.start(item)  # a long chunk goes in turns too (its last turn reads all)
        self.stats.requeued += 1
        self.backlog.push(item)
        self._wakeup.set()


def observe(hook: Callable[..., None] | None, *args: object) -> None:
    """A metrics hook: its failure is logged, never a lost answer."""
    if hook is not None:
        try:
            hook(*args)
        except Exception:
            log.exception("metrics hook failed")
