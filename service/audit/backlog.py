"""The audit writer's queue: messages waiting for the store, counted in records and in bytes.

Why bytes too: a record is about 1.3 kB for a tabular model, but a text model's holds its
answer's JSON, 1.4 MB for 1,024 texts: a bound of ten thousand records alone let the queue of a
store that is down grow to gigabytes. Each batch (one transaction, one pickled message to the
writer process) is bounded the same way.
"""

from __future__ import annotations

import time
from collections import deque

import orjson

from service.audit.rows import Message, PredictionMessage

QUEUE_BYTES = 256 * 2**20  # the queue's default bound in bytes (docs/AUDIT.md)
BATCH_BYTES = 16 * 2**20  # a batch's: its COPY takes well under the store's timeout
MESSAGE_OVERHEAD = 1024  # bytes a message holds besides its inputs and answer (about)


def weight(msg: Message) -> int:
    """About the bytes a queued message holds: its input bytes and answer JSON, and the rest."""
    if isinstance(msg, PredictionMessage):
        return len(msg.inputs) + len(msg.summary) + MESSAGE_OVERHEAD
    # A feedback's override reason is the client's JSON (a 7 MiB userComment counted 1 KiB:
    # sixty of them grew the queue of a store that was down by 420 MiB past its bound).
    try:
        return len(orjson.dumps(msg.override_reason)) + MESSAGE_OVERHEAD
    except TypeError:  # what orjson cannot write (an integer past 64 bits): about its text
        return len(repr(msg.override_reason)) + MESSAGE_OVERHEAD


class Backlog:
    """A FIFO of messages with their total weight; used on the event loop only."""

    def __init__(self) -> None:
        self._items: deque[Message] = deque()
        self._since: deque[float] = deque()  # when each was queued (monotonic)
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def full(self, records: int, nbytes: int, more: int | None = None) -> bool:
        """Whether it holds `records` records, or a message of `more` bytes (None: of the
        queued messages' mean size, the next one unknown) would take it past `nbytes`. An empty
        queue takes one message of any size: it could never go otherwise."""
        n = len(self._items)
        if n >= records:
            return True
        if more is None:
            more = self.bytes // n if n else 0
        return n > 0 and self.bytes + more > nbytes

    def append(self, msg: Message, nbytes: int) -> None:
        self._items.append(msg)
        self._since.append(time.monotonic())
        self.bytes += nbytes

    def waited(self) -> float:
        """Seconds the oldest message has been queued (0 when none is)."""
        return time.monotonic() - self._since[0] if self._since else 0.0

    def head(self, records: int, nbytes: int) -> list[Message]:
        """The oldest messages, up to `records` of them and `nbytes` (at least one)."""
        batch: list[Message] = []
        size = 0
        for msg in self._items:
            w = weight(msg)
            if batch and (len(batch) >= records or size + w > nbytes):
                break
            batch.append(msg)
            size += w
        return batch

    def drop(self, n: int) -> None:
        """Remove the `n` oldest (a batch that was written)."""
        for _ in range(n):
            self.bytes -= weight(self._items.popleft())
            self._since.popleft()
