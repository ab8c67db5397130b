"""What waits for compute in one model's batcher: one FIFO per length class, taken in turns.

A text model with length buckets (buckets.py) counts its work in tokens and queues each request
by its longest bucket; a batch takes from the queues in turn, oldest first within each, so a short
text waits for at most one batch of long ones, not for all that came before it. A model without
buckets has one queue: plain FIFO. Long requests waiting for their next turn (turns.py) queue
apart: a batch opens with the oldest of them when none is in flight, and while other requests
wait, batches open with a turn and without one by turns.
Expired and cancelled requests are dropped, never computed: when a batch is taken (`take`) and
again when the device is free for it (`screen`).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from service.engine.compute import Outcome
from service.engine.model import Prediction
from service.engine.params import PredictParams
from service.engine.sampler import MCRequest
from service.engine.turns import Turns
from service.errors import CancelledError, DeadlineExceededError, ShuttingDownError

EXPIRED = "the request's deadline passed while it waited in the queue; nothing more was computed"


# A request whose deadline passed after its batch had left the queue, before its answer.
LATE = (
    "the request's deadline passed before its batch was answered; its answer is dropped and "
    "what is left of its compute skipped"
)


def expired(item: Queued) -> DeadlineExceededError:
    """The 504 of a request whose deadline passed in the queue: before any compute, or
    between two turns of a long one (turns.py)."""
    t = item.turns
    return (
        t.late(during=False)
        if t is not None and t.done
        else DeadlineExceededError(EXPIRED, DeadlineExceededError.QUEUED)
    )


def late(item: Queued, message: str) -> DeadlineExceededError:
    """The 504 of a request whose deadline passed in flight: `message`, or for a request in
    turns, how many of its passes had run."""
    t = item.turns
    return t.late(during=True) if t is not None and t.done else DeadlineExceededError(message)


# The queue of requests waiting for their next turn (turns.py), beside the length classes (>= 0).
TURNS = -1
_NOTHING = np.empty((0,), np.float32)  # an expired request's inputs, dropped


@dataclass
class BatcherStats:
    submitted: int = 0
    completed: int = 0
    failed: int = 0
    rejected: int = 0  # queue full (429)
    expired: int = 0  # deadline passed before or during compute (504)
    cancelled: int = 0  # client gone before compute, or during it (compute stopped)
    requeued: int = 0  # adaptive chunks queued again (samples="auto")
    turns: int = 0  # turns of long requests queued again (turns.py)
    batches: int = 0
    batch_rows: list[int] = field(default_factory=list)  # recent batch sizes, for tests
    queue_rows: int = 0  # queued or in flight, until delivered


@dataclass
class Queued:
    """One request waiting for compute, with the future its caller awaits."""

    x: np.ndarray
    params: PredictParams
    req: MCRequest | None  # None: deterministic mode
    future: asyncio.Future[Prediction]
    enqueued: float
    deadline: float | None
    rows: int  # its cost, in the model's cost units (rows; tokens for a bucketed text model)
    queue: int = 0  # its length class (the longest bucket it needs; 0 without buckets)
    queued_at: float = field(default_factory=time.perf_counter)  # wall timing, for metrics
    queued: bool = False  # in the backlog now (not taken, dropped or in flight)
    timed_out: bool = False  # answered 504 by its deadline's timer (and counted there)
    released: bool = False  # expired in the backlog: rows given back, left for `take` to drop
    turns: Turns | None = None  # a long request computed in turns (turns.py)
    turn_rows: int = 0  # the cost of its next turn (`rows` stays the whole request's)
    chunks_s: float = 0.0  # compute seconds of its earlier adaptive chunks (samples=auto)

    @property
    def batch_rows(self) -> int:
        """What it adds to a batch: its next turn, else all of it."""
        return self.turn_rows if self.turns is not None else self.rows


class Backlog:
    """The queued requests of one model. Counts into the batcher's `stats`: `queue_rows` grows
    here and shrinks when a request is dropped here or delivered by the batcher."""

    def __init__(self, stats: BatcherStats) -> None:
        self.stats = stats
        self._queues: dict[int, deque[Queued]] = {}
        self._turn = 0  # the length class that opens the next batch, so the classes take turns
        self._turned = False  # the last batch opened with a turn of a long request
        self._dead = 0  # released items still in the queues

    def __bool__(self) -> bool:
        return any(self._queues.values())

    def push(self, item: Queued) -> None:
        """At the back of its length class's queue (a request in turns: of the turns' queue)."""
        key = TURNS if item.turns is not None else item.queue
        self._queues.setdefault(key, deque()).append(item)
        item.queued = True
        self.stats.queue_rows += item.rows

    def expire(self, item: Queued) -> None:
        """Its deadline's timer: a request not answered yet is answered 504 now, not when a
        batch would next reach it or its batch would land (behind a long request or a turn,
        seconds later). Still queued, it leaves the queue; in flight, its batch skips what is
        left of its rows (the sampler reads the same deadline) and drops its answer. On the
        event loop, like every count of a request's end (the screen only sorts)."""
        if item.future.done():
            return
        item.timed_out = True
        self.stats.expired += 1
        if item.queued:  # its room back now; the queue drops it when reached or compacted
            item.queued, item.released = False, True
            self.stats.queue_rows -= item.rows
            item.future.set_exception(expired(item))
            # Its inputs go now: left in the queue, 1,000 expired 1 MiB requests held 1 GB
            # while the row count said the queue was a tenth full (review R9).
            item.x, item.req = _NOTHING, None
            self._dead += 1
            if 2 * self._dead > sum(map(len, self._queues.values())):
                self._compact()
            return
        item.future.set_exception(late(item, LATE))

    def _compact(self) -> None:
        """Drop released items: each expiry was a search of its queue (10,000 queued requests
        whose deadlines passed together held the event loop for seconds); compacting once half
        the items are dead is linear in all, and frees their arrays."""
        for key, q in self._queues.items():
            self._queues[key] = deque(i for i in q if not i.released)
        self._dead = 0

    def oldest(self) -> float:
        """When the longest-waiting request was queued, for the batching timer (-inf: none but
        turns of long requests, which never wait for it)."""
        for q in self._queues.values():
            while q and q[0].released:  # an expired head would fire the timer early
                q.popleft()
                self._dead -= 1
        firsts = [q[0].enqueued for k, q in self._queues.items() if q and k != TURNS]
        return min(firsts, default=-math.inf)

    def rows(self) -> int:
        """The cost of what is queued now for the batching timer (in flight and turns not
        counted)."""
        queues = (q for k, q in self._queues.items() if k != TURNS)
        return sum(i.rows for q in queues for i in q if not i.released)

    def take(
        self, limit: int, clock: Callable[[], float], *, batching: bool = True, turn: bool = True
    ) -> list[Queued]:
        """Pop the next batch of at most `limit` rows (one request, whatever its size, without
        `batching`): with `turn`, the next turn of a long request first (turns.py), unless the
        last batch opened with one and other requests wait; then the class after the last
        batch's opener, then each class in order adds its oldest live items while they fit
        (one class: FIFO)."""
        batch: list[Queued] = []
        rows = 0
        turns = self._queues.get(TURNS)
        classes = sorted(k for k, q in self._queues.items() if q and k != TURNS)
        # Batches open with a turn and without one by turns while others wait: a turn may fill
        # a batch (or be one, without batching), and the requests behind it must get the next.
        if turn and turns and not (self._turned and classes):
            rows = self._open(batch, turns, clock)
        if (batch and not batching) or not classes:
            return self._opened(batch)
        start = next((i for i, k in enumerate(classes) if k >= self._turn), 0)
        order = classes[start:] + classes[:start]
        self._turn = order[0] + 1  # the next batch opens with the next class
        for k in order:
            q = self._queues[k]
            while q:
                item = self._drop_dead(q, clock())
                if item is None:
                    break
                if batch and (rows + item.batch_rows > limit or not batching):
                    break
                q.popleft().queued = False
                batch.append(item)
                rows += item.batch_rows
            if batch and not batching:
                break
        if not batch and turn and turns:  # every other request had gone: the turn after all
            self._open(batch, turns, clock)
        return self._opened(batch)

    def _open(self, batch: list[Queued], turns: deque[Queued], clock: Callable[[], float]) -> int:
        """Open `batch` with the oldest live turn; its rows (0: none live)."""
        first = self._drop_dead(turns, clock())
        if first is None:
            return 0
        turns.popleft().queued = False
        batch.append(first)
        return first.batch_rows

    def _opened(self, batch: list[Queued]) -> list[Queued]:
        self._turned = bool(batch) and batch[0].turns is not None
        return batch

    def _drop_dead(self, q: deque[Queued], now: float) -> Queued | None:
        """The first live item of `q` (None: none), dropping cancelled and expired ones."""
        while q:
            item = q[0]
            if item.future.done():  # cancelled by a disconnected client, or timed out
                self.stats.cancelled += not item.timed_out
            elif item.deadline is not None and now >= item.deadline:
                self.stats.expired += 1
                item.future.set_exception(expired(item))
            else:
                return item
            q.popleft().queued = False
            if item.released:  # its rows went back when it expired
                self._dead -= 1
            else:
                self.stats.queue_rows -= item.rows
        return None

    def screen(self, batch: list[Queued], now: float) -> tuple[list[Outcome | None], list[int]]:
        """Sort out what expired or lost its client while it waited for the device: (answers
        so far, indices still to compute). It may run on the compute thread, so it counts
        nothing: the batcher counts each request's end when the batch lands, on the loop."""
        out: list[Outcome | None] = [None] * len(batch)
        live = []
        for k, it in enumerate(batch):
            if it.future.done():
                out[k] = CancelledError("the client disconnected; its work was dropped")
            elif it.deadline is not None and now >= it.deadline:
                out[k] = expired(it)
            else:
                live.append(k)
        return out, live

    def shut(self, message: str) -> None:
        """Empty the backlog, failing every waiting request (ShuttingDownError: 503)."""
        for q in self._queues.values():
            for item in q:
                self.stats.queue_rows -= 0 if item.released else item.rows
                if not item.future.done():
                    item.future.set_exception(ShuttingDownError(message))
        self._queues.clear()
        self._dead = 0
