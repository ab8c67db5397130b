"""The backlog's deadline timers: an expiry gives its room back at once and costs no search."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterator

import numpy as np

from service.engine.backlog import EXPIRED, Backlog, BatcherStats, Queued
from service.engine.params import PredictParams
from service.errors import DeadlineExceededError


class CountingDeque(deque[Queued]):
    """Counts the items any search of the queue walks through."""

    walked = 0

    def __iter__(self) -> Iterator[Queued]:
        for item in super().__iter__():
            CountingDeque.walked += 1
            yield item


def item(loop: asyncio.AbstractEventLoop, rows: int) -> Queued:
    x = np.zeros((1, 4), np.float32)
    return Queued(
        x, PredictParams(samples=10, confidence=(0.95,)), None, loop.create_future(), 0.0, 1.0, rows
    )


async def test_expiring_queued_requests_walks_the_queue_a_bounded_number_of_times() -> None:
    """Each expiry searched its queue by identity: n deadlines passing together cost n^2/2
    steps (10,000 queued requests held the event loop for seconds). Now their rows go back at
    once and the queue is compacted when half of it is dead: linear in all."""
    loop = asyncio.get_running_loop()
    stats = BatcherStats()
    backlog = Backlog(stats)
    n = 2_000
    items = [item(loop, 3) for _ in range(n)]
    for it in items:
        backlog.push(it)
    backlog._queues[0] = CountingDeque(backlog._queues[0])
    CountingDeque.walked = 0
    for it in reversed(items):  # the last queued first: the old search walked the whole queue
        backlog.expire(it)
    assert CountingDeque.walked <= 2 * n, CountingDeque.walked  # the old code: n (n + 1) / 2
    assert stats.expired == n and stats.queue_rows == 0
    assert not backlog
    for it in items:
        exc = it.future.exception()
        assert isinstance(exc, DeadlineExceededError) and str(exc).startswith(EXPIRED)


async def test_an_expired_request_is_never_taken_and_its_rows_count_once() -> None:
    loop = asyncio.get_running_loop()
    stats = BatcherStats()
    backlog = Backlog(stats)
    a, b, c = item(loop, 5), item(loop, 7), item(loop, 11)
    for it in (a, b, c):
        backlog.push(it)
    backlog.expire(b)  # one of three: stays in its queue, released
    assert stats.queue_rows == 16 and backlog.rows() == 16
    batch = backlog.take(1_000, lambda: 0.0)
    assert batch == [a, c] and stats.queue_rows == 16  # delivered by the batcher, not here
    assert (stats.expired, stats.cancelled) == (1, 0)
    d = item(loop, 2)
    backlog.push(d)
    backlog.expire(d)  # alone: compacted away at once
    assert stats.queue_rows == 16 and not backlog
    e, f = item(loop, 4), item(loop, 6)
    backlog.push(e)
    backlog.push(f)
    backlog.expire(e)
    backlog.shut("stopping")
    assert stats.queue_rows == 16  # f's rows went back once, e's were already back
    assert stats.expired == 3
    for it in (b, d, e, f):  # 504 for the expired, 503 for the one still queued at the stop
        assert isinstance(it.future.exception(), Exception)


async def test_an_expiry_in_flight_is_late_and_keeps_its_rows() -> None:
    """A request whose batch left the queue keeps its rows until the batch lands."""
    loop = asyncio.get_running_loop()
    stats = BatcherStats()
    backlog = Backlog(stats)
    it = item(loop, 9)
    backlog.push(it)
    assert backlog.take(100, lambda: 0.0) == [it] and not it.queued
    backlog.expire(it)
    assert stats.queue_rows == 9 and it.timed_out and not it.released
    assert str(it.future.exception()).startswith("the request's deadline passed before its batch")


async def test_an_expired_request_lets_go_of_its_inputs_and_of_the_timer() -> None:
    """Left in its queue, an expired request held its inputs (1,000 expired 1 MiB requests
    held 1 GB while the row count said a tenth full), and as the queue's head it set the
    batching timer's start (review R9)."""
    loop = asyncio.get_running_loop()
    backlog = Backlog(BatcherStats())
    a, b, c = item(loop, 1), item(loop, 1), item(loop, 1)
    a.enqueued, b.enqueued, c.enqueued = 0.0, 0.9, 1.0
    for it in (a, b, c):
        backlog.push(it)
    backlog.expire(a)  # one of three: not compacted, still at the head
    assert a.x.size == 0 and a.req is None
    assert backlog.oldest() == 0.9
    assert backlog.take(10, lambda: 0.0) == [b, c]
    a.future.exception()
