"""Turns: a long MC request is computed a share of its passes at a time, so that it holds the
compute for about one turn before the requests that came after it get theirs.

Without turns, one legal request (1,024 long texts x 1,000 passes) went to the compute whole and
every request behind it waited minutes (a deadline bounded only its own wait). Now a request
whose passes would take longer than a turn (`MCSERVE_TURN_MS`, at the batcher's measured rows per
second; never less than MIN_ROWS rows) runs its first passes, goes to the back of the
queue, and goes on from the next pass when its turn comes again: its samples come back to the
server, and its last turn takes them along, so the compute summarises all of them as if they had
been computed at once.

The same bits as one whole run: a pass's masks are keyed by the pass (`MCRequest.first`), and a
turn's passes are a multiple of `quantum(model)` passes, so every row of a later turn sits at the
same place within its block of rows as it did in the whole request (sampler.py: fixed blocks).
An adaptive request (samples="auto") runs in chunks through the queue (batcher.py); a chunk
that would hold the compute longer than a turn is cut into turns too, and its last turn decides
whether the request needs more passes.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from service.engine.compute import Work
from service.engine.model import ServedModel

if TYPE_CHECKING:
    from service.engine.backlog import Queued

# The least a turn holds, in rows at full size: the compute process's batch (settings'
# slice_rows), where per-batch costs were measured to stop mattering (batcher.py).
MIN_ROWS = 1600


@dataclass
class Turns:
    """Where a request cut into turns stands: passes asked, done, and their samples so far."""

    total: int
    quantum: int
    done: int = 0
    parts: list[np.ndarray] = field(default_factory=list)
    compute_s: float = 0.0  # summed over its turns (the answer's timing)

    @property
    def left(self) -> int:
        return self.total - self.done

    def add(self, samples: np.ndarray, seconds: float) -> None:
        """One turn's samples [passes, B, ...] came back."""
        self.parts.append(samples)
        self.done += int(samples.shape[0])
        self.compute_s += seconds

    def prior(self) -> np.ndarray | None:
        """The samples of the turns before the last, for the last to be summarised with."""
        return np.concatenate(self.parts) if self.parts else None


def quantum(model: ServedModel) -> int:
    """The passes a turn is a multiple of: the least common multiple of the model's row blocks
    (a row's place within its block must not move between a whole run and turns)."""
    samplers = [model.sampler, *model.samplers.values()]
    return math.lcm(*(s.block for s in samplers))


def passes(budget: int, per_pass: int, quantum: int, left: int) -> int:
    """The passes of the next turn: as many whole quanta as `budget` (cost units) holds at
    `per_pass` each, at least one quantum, at most what is left."""
    fits = budget // max(per_pass, 1) // quantum * quantum
    return min(left, max(quantum, fits))


def budget(turn_s: float, rows_per_s: float, unit: int, measured: bool) -> int:
    """The cost a turn may hold the compute for (0: no turns): `turn_s` at the batcher's
    measured rate, never less than MIN_ROWS rows at full size (nor more before a rate is
    measured: the batcher's first guess is far above a text model's)."""
    if turn_s <= 0:
        return 0
    least = MIN_ROWS * unit
    return max(least, int(rows_per_s * turn_s)) if measured else least


def cut(item: Queued, model: ServedModel, budget: int) -> None:
    """Set a request in turns to its next turn's passes: `req` runs them, `turn_rows` is what
    they cost a batch, `rows` what is left of the whole (the queue's count)."""
    t, req = item.turns, item.req
    assert t is not None and req is not None
    per_pass = model.cost(item.x, 1)
    n = passes(budget or item.rows, per_pass, t.quantum, t.left)
    item.req = dataclasses.replace(req, samples=n, first=t.done)
    item.turn_rows = per_pass * n
    item.rows = per_pass * t.left


def work(item: Queued) -> Work:
    """What the compute runs for a queued request: a turn that is not its last comes back as
    samples (compute.Part); the last takes the earlier turns' samples along to be summarised."""
    t = item.turns
    if t is None or item.req is None:
        return Work(item.x, item.params, item.req)
    if item.req.samples < t.left:
        return Work(item.x, item.params, item.req, part=True)
    return Work(item.x, item.params, item.req, prior=t.prior())
