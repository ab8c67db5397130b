"""Where each stochastic row of a batch comes from: its request, its prefix row, the counter
base of its dropout masks and the layer keys (sampler.py lays requests out pass-major, each
from a block boundary; docs/RANDOM_NUMBERS.md says why a row's masks depend on nothing else).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from service.engine.blocks import BLOCK_ROWS
from service.engine.masks import counter_base, signed_key

if TYPE_CHECKING:
    from service.engine.sampler import MCRequest


class RowMap:
    """Per stochastic row of a batch: its prefix row, its mask counter base and layer keys.

    Built once per batch with a handful of vectorised ops, so mask generation costs the same
    whether a batch holds one request or a thousand.
    """

    def __init__(
        self, requests: Sequence[MCRequest], layers: range, device: torch.device, block: int
    ) -> None:
        counts = [round_up(r.rows, block) for r in requests]
        self.starts = np.cumsum([0, *counts])
        self.total = int(self.starts[-1])
        self._ends = [(r.deadline, r.cancel) for r in requests]
        self._stoppable = any(d is not None or c is not None for d, c in self._ends)
        shapes = tuple((r.samples, int(r.x.shape[0]), r.first) for r in requests)
        # A turn's layout (first > 0) is seen once: it would push the steady shapes out.
        cached = self.total <= CACHED_ROWS and not any(r.first for r in requests)
        build = cached_layout if cached else layout
        index = tuple(r.index for r in requests) if any(r.index for r in requests) else None
        self.prefix_row, self.base, row_req = build(shapes, device, block, index)
        if len(requests) == 1:  # the common case at low load: one key per layer, no gather
            seed = requests[0].seed
            self.keys = [
                torch.full((self.total,), signed_key(seed, layer), dtype=torch.int64, device=device)
                for layer in layers
            ]
            return
        self.keys = [
            torch.tensor([signed_key(r.seed, layer) for r in requests], dtype=torch.int64)[
                row_req
            ].to(device)
            for layer in layers
        ]

    def stopped(self, lo: int, hi: int) -> bool:
        """Whether every request with rows in [lo, hi) is past its deadline or its client has
        gone (`MCRequest.deadline`, `.cancel`): those rows need not be computed."""
        if not self._stoppable:
            return False
        first = int(np.searchsorted(self.starts, lo, side="right")) - 1
        last = int(np.searchsorted(self.starts, hi - 1, side="right")) - 1
        now = time.monotonic()
        return all(
            (d is not None and now >= d) or (c is not None and c.is_set())
            for d, c in self._ends[first : last + 1]
        )


def block_rows(example: torch.Tensor) -> int:
    """Sample rows per block of the suffix's linear layers. A token sequence's row already holds
    its L tokens, so a block of max(1, 64 // L) rows is a product of at least 64 token rows, and
    a request of few texts is not padded to 64 sample rows. Measured (2026-12-06, shared AMD
    EPYC, medians of 5 interleaved runs, bench.text's transformer with L = 128, T = 20): 16 texts
    683 ms with one-row blocks against 820 ms with 64-row blocks; one text 217 against 247 ms."""
    if example.dtype.is_floating_point or example.dim() != 2:
        return BLOCK_ROWS
    return max(1, BLOCK_ROWS // max(int(example.shape[1]), 1))


def round_up(n: int, block: int) -> int:
    return -(-n // block) * block


def layout(
    shapes: tuple[tuple[int, int, int], ...],
    device: torch.device,
    block: int = 1,
    index: tuple[tuple[int, ...] | None, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prefix row and counter base (on `device`) and request index (on the CPU) of each row of
    requests of these (samples, inputs, first pass), one after the other, each pass-major (row =
    t * b + i within a request, for passes first .. first + samples - 1) and starting at a
    multiple of `block`. A request's padding rows (up to its next block boundary) repeat its
    first row; their results are never read. `index`: per request, the row its input i is keyed
    by in the counter (None: i)."""
    counts = [round_up(t * b, block) for t, b, _ in shapes]
    starts = np.cumsum([0, *counts])
    b = torch.tensor([b for _, b, _ in shapes], dtype=torch.int64)
    first = torch.tensor([f for _, _, f in shapes], dtype=torch.int64)
    offsets = torch.tensor(np.cumsum([0, *[b for _, b, _ in shapes]])[:-1])
    row_req = torch.repeat_interleave(torch.arange(len(shapes)), torch.tensor(counts))
    local = torch.arange(int(starts[-1])) - torch.tensor(starts[:-1])[row_req]
    real = torch.tensor([t * b for t, b, _ in shapes], dtype=torch.int64)[row_req]
    local = torch.where(local < real, local, 0)
    b_row = b[row_req]
    t = torch.div(local, b_row, rounding_mode="floor")
    i = local - t * b_row
    t = t + first[row_req]  # a turn of a longer request (turns.py) goes on from its pass
    if index is not None:
        keyed = torch.tensor(
            [k for (_, b, _), ix in zip(shapes, index, strict=True) for k in (ix or range(b))],
            dtype=torch.int64,
        )
        return (
            (offsets[row_req] + i).to(device),
            counter_base(t, keyed[offsets[row_req] + i]).to(device),
            row_req,
        )
    return (offsets[row_req] + i).to(device), counter_base(t, i).to(device), row_req


# Cached by the batch's shapes: at low load every batch is one request of the same shape, and
# building the layout took 50-150 us per call (a tenth of a 1 ms answer); under load, with the
# compute process's slices of 16 one-input requests, it was a tenth of a digits batch (0.22 of
# 1.95 ms). Small layouts only: at most 64 of 16,384 rows (25 MiB); the tensors are only read.
CACHED_ROWS = 16384
cached_layout = functools.lru_cache(maxsize=64)(layout)
