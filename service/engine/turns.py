"""Turns: a long MC request is computed a share of its passes at a time, so that it holds the
compute for about one turn before the requests that came after it get theirs.

Without turns, one legal request (1,024 long texts x 1,000 passes) went to the compute whole and
every request behind it waited minutes (a deadline bounded only its own wait). Now a request
whose passes would take longer than a turn (`MCSERVE_TURN_MS` at the compute's measured rows per
second; MIN_ROWS rows until a rate is measured, and never fewer) runs its first passes, waits
in the batcher's queue of turns while a batch of the requests that came meanwhile goes (one turn
per model in flight; backlog.py), and goes on from the next pass: its samples come back to the
server, and its last turn takes them along, so the compute summarises all of them as if they
had been computed at once.

The same bits as one whole run: a pass's masks are keyed by the pass (`MCRequest.first`), and a
turn's passes are a multiple of `quantum(model, x)`, so every row of a later turn sits at the
same place within its block of rows as it did in the whole request (sampler.py: fixed blocks).
An adaptive request (samples="auto") runs in chunks through the queue (batcher.py); a chunk
that would hold the compute longer than a turn is cut into turns too, and its last turn decides
whether the request needs more passes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from service.engine.compute import Outcome, Work
from service.engine.model import ServedModel
from service.errors import DeadlineExceededError

if TYPE_CHECKING:
    from service.engine.backlog import Queued

# The least a turn holds, in rows at full size: the compute process's batch (settings'
# slice_rows), where per-batch costs were measured to stop mattering (batcher.py).
MIN_ROWS = 1600


@dataclass
class Turns:
    """Where a request cut into turns stands: passes asked and done, and the samples so far."""

    total: int
    quantum: int
    done: int = 0
    # [total, B, ...], filled turn by turn: one copy of each turn's samples (on the thread, a
    # turn's samples are a view of its whole batch's output, which this lets go).
    samples: np.ndarray | None = None
    compute_s: float = 0.0  # summed over its turns (the answer's timing)

    @property
    def left(self) -> int:
        return self.total - self.done

    def add(self, part: np.ndarray, seconds: float) -> None:
        """One turn's samples [passes, B, ...] came back."""
        if self.samples is None:
            self.samples = np.empty((self.total, *part.shape[1:]), dtype=part.dtype)
        self.samples[self.done : self.done + part.shape[0]] = part
        self.done += int(part.shape[0])
        self.compute_s += seconds

    def prior(self) -> np.ndarray | None:
        """The samples of the turns before the last, for the last to be summarised with."""
        return None if self.samples is None else self.samples[: self.done]

    def late(self, during: bool) -> DeadlineExceededError:
        """The 504 of a deadline that passed during a later turn or between two."""
        return DeadlineExceededError(
            f"the request's deadline passed {'during' if during else 'between'} turns of its "
            f"compute, after {self.done} of its {self.total} passes; the rest was skipped and "
            "its answer dropped"
        )


def quantum(model: ServedModel, x: np.ndarray) -> int:
    """The passes a turn is a multiple of, so that each input's rows keep their place within
    the sampler's row blocks: pass f of B inputs starts at row f * B, a whole number of blocks
    when f is a multiple of block / gcd(block, B); for a text model, per length bucket."""
    if model.buckets is None:
        groups = [(model.sampler.block, int(x.shape[0]))]
    else:
        lengths, counts = np.unique(model.buckets.of(x), return_counts=True)
        groups = [
            (model.samplers[int(n)].block, int(c)) for n, c in zip(lengths, counts, strict=True)
        ]
    return math.lcm(*(block // math.gcd(block, b) for block, b in groups))


def passes(budget: int, per_pass: int, quantum: int, left: int) -> int:
    """The passes of the next turn: whole quanta, enough to fill `budget` (cost units) at
    `per_pass` each (at most a quantum more), at most what is left."""
    per_quantum = max(per_pass, 1) * quantum
    return min(left, -(-budget // per_quantum) * quantum)


class Pacer:
    """One batcher's turns: which requests go in turns, each turn's passes, and the compute's
    rate they are sized by.

    The rate is measured from batches of at least MIN_ROWS rows whose every request ran whole
    (a dropped, stopped or failed request's rows were not all computed), over the time each
    batch had the compute to itself: with the compute process, a batch sent while the one
    before it computes waits behind it first. (Another model's batches in the same process
    still count against this one's rate: its turns then come out shorter, never longer.)
    """

    def __init__(self, model: ServedModel, turn_s: float, unit: int) -> None:
        self.model = model
        self.turn_s = turn_s  # 0: every request whole
        self.least = MIN_ROWS * unit
        self.rate: float | None = None  # cost units per second of compute
        self._last = 0.0  # when the last batch landed (time.perf_counter)

    def budget(self) -> int:
        """The cost a turn may hold the compute for (0: no turns)."""
        if self.turn_s <= 0:
            return 0
        if self.rate is None:
            return self.least
        return int(min(max(self.least, self.rate * self.turn_s), 2.0**62))

    def start(self, item: Queued) -> None:
        """Put an MC request (or an adaptive request's next chunk) in turns when its passes
        would hold the compute longer than one."""
        item.turns = None
        budget = self.budget()
        if item.req is not None and 0 < budget < item.rows:
            item.turns = Turns(item.req.samples, quantum(self.model, item.x))
            self.cut(item)

    def cut(self, item: Queued) -> None:
        """Set a request in turns to its next turn's passes: `req` runs them, `turn_rows` is
        what they cost a batch. `rows`, the queue's count, stays the whole request's until it
        is answered: its finished turns' samples are held meanwhile."""
        t, req = item.turns, item.req
        assert t is not None and req is not None
        per_pass = self.model.cost(item.x, 1)
        n = passes(self.budget() or item.rows, per_pass, t.quantum, t.left)
        item.req = dataclasses.replace(req, samples=n, first=t.done)
        item.turn_rows = per_pass * n
        item.rows = per_pass * t.total

    def landed(self, rows: int, results: Sequence[Outcome], start: float, now: float) -> None:
        """A batch of `rows` sent at `start` answered at `now`: measure the rate from it."""
        busy = now - max(start, self._last)
        self._last = now
        if rows < self.least or busy <= 0:
            return
        if any(isinstance(r, BaseException) for r in results):
            return
        rate = rows / busy
        self.rate = rate if self.rate is None else 0.8 * self.rate + 0.2 * rate


def work(item: Queued) -> Work:
    """What the compute runs for a queued request: a turn that is not its last comes back as
    samples (compute.Part); the last takes the earlier turns' samples along to be summarised."""
    t = item.turns
    if t is None or item.req is None:
        return Work(item.x, item.params, item.req)
    if item.req.samples < t.left:
        return Work(item.x, item.params, item.req, part=True)
    return Work(item.x, item.params, item.req, prior=t.prior())
