"""A text model's length buckets at serve time: a text runs padded to the smallest bucket that
holds its own tokens (the bucket lengths are the manifest's `inputs.text.buckets`).

Requests arrive padded to `max_tokens`. A row's length is read from the row alone (its last
id that is not padding), so its bucket, and with it every shape its forward sees, never depends
on what shares its request or batch: its samples are the same bits alone, among longer texts or
replayed from the seed. Each bucket has its own sampler (the same weights, a graph split for that
length); one batch makes one forward per bucket present (chunked by the token budget), and a
text's masks stay keyed by its place in its request (`MCRequest.index`), whichever bucket it
lands in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np

from service.engine.sampler import MCRequest, MCSampler


def row_lengths(x: np.ndarray, pad_id: int) -> np.ndarray:
    """Per row of ids [B, L]: one past its last id that is not `pad_id` (0 for all padding)."""
    real = np.asarray(x) != pad_id
    last = real.shape[1] - np.argmax(real[:, ::-1], axis=1)
    return np.where(real.any(axis=1), last, 0)


class Buckets:
    """The bucket lengths of one text model and the grouping of rows by them."""

    def __init__(self, lengths: Sequence[int], pad_id: int) -> None:
        self.lengths = np.asarray(sorted(lengths), dtype=np.int64)
        self.pad_id = pad_id

    @property
    def max_tokens(self) -> int:
        return int(self.lengths[-1])

    def of(self, x: np.ndarray) -> np.ndarray:
        """Per row, the length it runs at: the smallest bucket that holds its tokens."""
        at = np.searchsorted(self.lengths, row_lengths(x, self.pad_id), side="left")
        return self.lengths[np.minimum(at, len(self.lengths) - 1)]

    def tokens(self, x: np.ndarray) -> int:
        """Tokens one pass over these rows computes (each at its bucket's length)."""
        return int(self.of(x).sum())

    def split(self, req: MCRequest) -> list[tuple[int, np.ndarray, MCRequest]]:
        """(length, positions in the request, the sub-request cut to that length) per bucket."""
        at = self.of(req.x)
        base = np.arange(req.x.shape[0]) if req.index is None else np.asarray(req.index)
        out = []
        for n in np.unique(at):
            pos = np.flatnonzero(at == n)
            x = np.ascontiguousarray(req.x[pos, :n])
            keyed = tuple(int(k) for k in base[pos])
            out.append((int(n), pos, replace(req, x=x, index=keyed)))
        return out

    def run(self, samplers: dict[int, MCSampler], reqs: Sequence[MCRequest]) -> list[np.ndarray]:
        """Samples [T, B, *output] per request, as `MCSampler.run`: one run per bucket."""
        plans = [self.split(r) for r in reqs]
        by_length: dict[int, list[MCRequest]] = {}
        for plan in plans:
            for n, _, sub in plan:
                by_length.setdefault(n, []).append(sub)
        done = {n: iter(samplers[n].run(subs)) for n, subs in by_length.items()}
        results = []
        for r, plan in zip(reqs, plans, strict=True):
            parts = [(pos, next(done[n])) for n, pos, _ in plan]
            out = np.empty((r.samples, r.x.shape[0], *parts[0][1].shape[2:]), dtype=np.float32)
            for pos, smp in parts:
                out[:, pos] = smp
            results.append(out)
        return results

    def each(self, x: np.ndarray, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """`fn` over the rows of each bucket, cut to its length, put back in order (the
        deterministic path, dropout off)."""
        at = self.of(x)
        parts = [(np.flatnonzero(at == n), int(n)) for n in np.unique(at)]
        outs = [(pos, fn(np.ascontiguousarray(x[pos, :n]))) for pos, n in parts]
        out = np.empty((x.shape[0], *outs[0][1].shape[1:]), dtype=np.float32)
        for pos, o in outs:
            out[pos] = o
        return out
