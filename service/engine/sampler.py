"""The Monte Carlo dropout sampler: T passes over B inputs as one vectorised forward.

Shapes are samples-first: a request's result is `[T, B, *output]`. Rows of the stochastic
forward are laid out pass-major inside each request (row = t * B + i), requests one after the
other. The deterministic prefix runs once over all inputs of the batch; its values are gathered
into the rows, masks are generated per chunk of rows, and the suffix runs chunk by chunk within a
row budget.

A seeded request's samples are the same bits alone or in any batch (docs/RANDOM_NUMBERS.md). On
the CPU that takes fixed shapes where a matrix product's rounding depends on shape (blocks.py):
every linear layer runs in blocks of identical products, `BLOCK_ROWS` rows in the suffix and one
input in the prefix, and each request starts at a block boundary (its rows are padded up to a
whole number of blocks). The prefix is also padded to at least `min_rows` inputs where its
operations choose their algorithm by the batch size: convolutions take other algorithms for a
handful of images (measured: oneDNN, 1 image against 64); a prefix without such operations
(prefix.py: a transformer's) is padded to 2 inputs only. On CUDA
every forward is padded to the full row budget: cuBLAS picks its kernel (and so its summation
order) by shape, and one fixed shape also lets the chunk function be captured once as a CUDA
graph.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from service.engine import budgets, progress, suffix
from service.engine.blocks import BLOCK_ROWS, block_linears
from service.engine.cancels import Flag
from service.engine.device import tune_allocator
from service.engine.fused import verified
from service.engine.graph import SplitGraph, split
from service.engine.inplace import write_in_place
from service.engine.masks import MAX_PASSES
from service.engine.plans import Plan, Plans
from service.engine.prefix import Prefix
from service.engine.rows import RowMap, block_rows, round_up
from service.errors import InvalidInputError

# The engine's float arithmetic, numbered: bumped when the same bundle, inputs and seed give other
# last bits (audit records carry it, so a replay can say why it differs). 2 (2026-11-27): the
# prefix rewritten for inference (BatchNorm folded, channels-last); the fused mask kernel did not
# change any number. 3 (2026-12-06): linear layers in fixed row blocks on the CPU (blocks.py).
# 4 (2026-12-06): a calibrated classifier's deterministic answer goes through its calibration
# (model.py); MC answers did not change. 5 (2026-12-07): linear layers blocked along the axis
# that holds the batch (blocks.row_layout); batch-first models' answers did not change, those
# with a seq-first, flattened or table linear in the prefix were wrong before; the standard
# errors of the mean (mc_standard_error, probability_se) use the sample std (ddof=1), and an
# entropy of 0 is +0.0, not -0.0.
NUMERICS = 5

# Inputs a prefix without batch-size-dependent operations is padded to (prefix.py).
MIN_PREFIX_ROWS = 2


@dataclass(frozen=True)
class MCRequest:
    """One request's work: inputs [B, *input_shape], T passes, and the seed of its masks.

    `index`: the row each input's masks are keyed by, where the inputs are part of a larger
    request (a text model's length bucket, service/engine/buckets.py); None: 0 .. B-1.
    `sites`: sample only the last k dropout sites (graph order), None: every site.
    `first`: the pass its samples start at (a turn of a longer request, turns.py): its masks are
    those of passes first .. first + samples - 1, so turns put together are the whole request's
    samples, bit for bit.
    `deadline`: a `time.monotonic()` after which its passes are not worth computing, and
    `cancel`: the flag its server sets when the client goes (cancels.py). Chunks holding only
    rows of requests past either are skipped (their rows are NaN) and `compute.run` fails those
    requests. Where a chunk also holds live rows it runs whole, so a live request's numbers
    never depend on another's deadline or client. (On CUDA the loop queues chunks ahead of the
    device, so the checks run early: a stop there takes effect later, if at all.)"""

    x: np.ndarray
    samples: int
    seed: int
    index: tuple[int, ...] | None = None
    sites: int | None = None
    deadline: float | None = None
    cancel: Flag | None = None
    first: int = 0

    @property
    def rows(self) -> int:
        return self.samples * int(self.x.shape[0])


@dataclass
class SamplerStats:
    """Counters that tests and metrics read (how much work really ran, and how it was shared)."""

    batches: int = 0  # calls of run()
    requests: int = 0
    prefix_forwards: int = 0
    forwards: int = 0  # suffix (stochastic) forwards, one per chunk
    skipped: int = 0  # chunks not run: every request in them was past its deadline or gone
    rows: int = 0  # stochastic rows computed, padding excluded
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)


def _dropout_off(module: nn.Module) -> nn.Module:
    """eval() everywhere: normalisation frozen; dropout is applied by the sampler's masks."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


class MCSampler:
    """Runs MC dropout for batches of requests on one device. Thread-safe for one caller."""

    def __init__(
        self,
        module: nn.Module,
        example: torch.Tensor,
        *,
        device: torch.device | str | None = None,
        row_budget: int = 16384,
        min_rows: int | None = None,
        use_prefix: bool = True,
        compile_mode: str | None = None,
        fused: bool | None = None,
        token_budget: int | None = budgets.TOKEN_BUDGET,
        activation_budget: bool = True,  # False: rows as the row budget says (bench/chunks.py)
    ) -> None:
        tune_allocator()  # activations reuse heap pages instead of fresh mmap()s (device.py)
        self.device = torch.device(device) if device is not None else default_device()
        self.module = _dropout_off(module).to(self.device)
        # Token ids stay integers (an embedding reads them); everything else is float32.
        self.input_dtype = torch.int64 if not example.dtype.is_floating_point else torch.float32
        example = example.to(self.device, self.input_dtype)
        self._example, self._use_prefix = example, use_prefix
        self.input_shape = tuple(example.shape[1:])
        cuda = self.device.type == "cuda"
        # Rows per block: each request starts at a block boundary (see the module docstring).
        self.block = 1 if cuda else block_rows(example)
        main = self._build(None)  # every site: the split every model has
        self.graph: SplitGraph = main.graph
        self.prefix: Prefix = main.prefix
        self.sites = len(self.graph.sites)
        self.plans = Plans(self._build, main, self.sites)  # other settings, on first use
        self._fixed_rows = min_rows is not None or cuda  # every prefix padded to min_rows
        if min_rows is None:  # fixed shapes on CUDA (see the module docstring)
            min_rows = int(row_budget) if cuda else BLOCK_ROWS
        self.min_rows = round_up(int(min_rows), self.block)
        tokens = self.input_dtype == torch.int64 and len(self.input_shape) == 1
        if token_budget is not None and tokens and not cuda:
            row_budget = min(int(row_budget), int(token_budget) // max(self.input_shape[0], 1))
        if activation_budget and not cuda:  # (CUDA: unchanged, untested there)
            row_budget = budgets.rows_within(module, int(row_budget))
        self.row_budget = round_up(max(int(row_budget), self.min_rows), self.block)
        # Inputs per prefix forward. With fixed shapes (CUDA, or a given min_rows) every chunk
        # is padded to it, so it is held within the budget too (on CUDA min_rows is the whole
        # row budget: 16,384 abstracts' prefix, 64 GB). Otherwise never fewer than min_rows, the
        # pad a batch-sensitive prefix needs: a chunk's shapes are a small batch's (same bits).
        budget_rows = budgets.rows_within(self.module, 1 << 30, budgets.PREFIX_BUDGET)
        if self._fixed_rows:
            self.prefix_chunk = min(budget_rows, self.min_rows)
        else:
            self.prefix_chunk = max(budget_rows, self.min_rows)
        self.stats = SamplerStats()
        # On the CPU masks are made and applied in one pass by a numba kernel (fused.py), with
        # the same numbers as the torch path. Optional torch.compile of the per-chunk work
        # instead (masks fused with the suffix by inductor); e.g. "reduce-overhead" adds CUDA
        # graphs. Off by default: compiling takes seconds per model.
        if fused is None:
            fused = not cuda and compile_mode is None
        if fused and (cuda or compile_mode is not None):
            raise ValueError("fused masks are a CPU kernel and do not combine with compile_mode")
        channels = any(len(site.mask_shape) > 1 for site in self.graph.sites)
        self.fused = bool(fused) and verified(channels)
        if compile_mode is not None:
            self._chunk = torch.compile(suffix.eager, mode=compile_mode, dynamic=not cuda)
        else:
            self._chunk = suffix.fused if self.fused else suffix.eager

    def _build(self, sites: int | None) -> Plan:
        graph = split(self.module, self._example, use_prefix=self._use_prefix, sampled=sites)
        prefix = Prefix(graph.prefix, self._example)  # rewritten for inference (prefix.py)
        if self.device.type != "cuda":
            if block_linears(prefix.module, 1, graph.linear_rows, prefix=True):
                prefix.batch_sensitive = True  # a plain linear there: pad as convolutions are
            block_linears(graph.suffix, self.block, graph.linear_rows, prefix=False)
            write_in_place(prefix.module)  # fewer fresh activations, the same numbers
            write_in_place(graph.suffix)
        return Plan(graph, prefix)

    def plan(self, sites: int | None) -> Plan:
        """The split that samples the last `sites` dropout sites (plans.py)."""
        return self.plans.get(sites)

    def pin(self, sites: int | None) -> None:
        """Build the split for `sites` now and keep it for good (a model's default setting)."""
        self.plans.pin(sites)

    def prefix_rows(self, plan: Plan) -> int:
        """Inputs the prefix of `plan` is padded to (see the module docstring)."""
        if self._fixed_rows:
            return self.prefix_chunk  # one shape for every prefix forward
        if plan.prefix.batch_sensitive:
            return self.min_rows
        return MIN_PREFIX_ROWS

    @property
    def output_shape(self) -> tuple[int, ...]:
        return self.graph.output_shape

    def _check(self, req: MCRequest) -> None:
        if tuple(req.x.shape[1:]) != self.input_shape:
            raise InvalidInputError(
                f"each input must have shape {list(self.input_shape)}, got {list(req.x.shape[1:])}"
            )
        if req.index is not None and len(req.index) != req.x.shape[0]:
            raise ValueError(f"{len(req.index)} mask rows for {req.x.shape[0]} inputs")
        if not 1 <= req.samples < MAX_PASSES:
            raise InvalidInputError(f"samples must be in [1, {MAX_PASSES - 1}], got {req.samples}")
        if not 0 <= req.first < MAX_PASSES - req.samples:
            raise ValueError(f"passes {req.first} .. {req.first + req.samples - 1} of a request")
        if req.sites is not None and not 1 <= req.sites <= self.sites:
            raise InvalidInputError(
                f"dropout_sites must be 'all' or the last k sites with 1 <= k <= {self.sites} "
                f"(the model has {self.sites}), got {req.sites}"
            )

    def _pad(self, t: torch.Tensor, rows: int) -> torch.Tensor:
        if t.shape[0] >= rows:
            return t
        # Copies of row 0, not zeros: a model may index by its input (the last token's place),
        # and an all-padding row made index -1 there.
        return torch.cat([t, t[:1].expand(rows - t.shape[0], *t.shape[1:])])

    def deterministic(self, x: np.ndarray) -> np.ndarray:
        """Dropout off (the weight-scaling approximation), plain torch forward, `prefix_chunk`
        inputs at a time."""
        xt = torch.as_tensor(np.ascontiguousarray(x), dtype=self.input_dtype, device=self.device)
        pad = self.prefix_chunk if self._fixed_rows else self.min_rows
        outs = [xt.new_empty((0, *self.output_shape), dtype=torch.float32)]  # 0 inputs: none
        with torch.inference_mode():
            for lo in range(0, xt.shape[0], self.prefix_chunk):
                part = xt[lo : lo + self.prefix_chunk]
                outs.append(self.module(self._pad(part, pad))[: part.shape[0]].float())
                progress.tick()
        return torch.cat(outs).cpu().numpy()

    def run(self, requests: Sequence[MCRequest]) -> list[np.ndarray]:
        """Samples [T, B, *output] (float32) for each request, in order. Requests with other
        dropout-site settings run other graphs: one shared forward per setting."""
        for r in requests:
            self._check(r)
        groups: dict[int, list[int]] = {}
        for k, r in enumerate(requests):
            groups.setdefault(self.sites if r.sites is None else r.sites, []).append(k)
        if len(groups) == 1:
            return self._run(self.plan(next(iter(groups))), requests)
        result: list[np.ndarray | None] = [None] * len(requests)
        for sites, members in groups.items():
            outs = self._run(self.plan(sites), [requests[k] for k in members])
            for k, out in zip(members, outs, strict=True):
                result[k] = out
        return [r for r in result if r is not None]

    def _run(self, plan: Plan, requests: Sequence[MCRequest]) -> list[np.ndarray]:
        if not requests:
            return []
        g = plan.graph
        dev = self.device
        with torch.inference_mode():
            xs = torch.as_tensor(
                np.concatenate([np.asarray(r.x) for r in requests]),
                dtype=self.input_dtype,
                device=dev,
            )
            # The prefix's values for every input, prefix_chunk inputs at a time (prefix.py).
            frontier = plan.prefix.in_chunks(
                xs, self.prefix_chunk, self.prefix_rows(plan), plan.graph.frontier_batched
            )
            layers = range(g.first_site, g.first_site + len(g.sites))
            rows = RowMap(requests, layers, dev, self.block)
            total = rows.total
            out = torch.empty((total, *g.output_shape), dtype=torch.float32, device=dev)
            forwards = skipped = 0
            for lo in range(0, total, self.row_budget):
                hi = min(lo + self.row_budget, total)
                if rows.stopped(lo, hi):
                    out[lo:hi] = math.nan
                    skipped += 1
                    continue
                n = hi - lo
                padded = max(n, self.min_rows)
                idx = self._pad(rows.prefix_row[lo:hi], padded)  # padded rows: row 0, unused
                inputs = [
                    f
                    if not b or (self.fused and site is not None)  # gathered by the kernel
                    else f.index_select(0, idx)
                    for f, b, site in zip(
                        frontier, g.frontier_batched, g.frontier_site, strict=True
                    )
                ]
                keys = [self._pad(k[lo:hi], padded) for k in rows.keys]
                base = self._pad(rows.base[lo:hi], padded)  # padded rows: masks unused
                out[lo:hi] = self._chunk(g, inputs, keys, base, idx)[:n].float()
                forwards += 1
                progress.tick()
            self.stats.add(
                batches=1,
                requests=len(requests),
                prefix_forwards=1,
                forwards=forwards,
                skipped=skipped,
                rows=sum(r.rows for r in requests),
            )
            result = []
            host = out.cpu().numpy()
            for r, s in zip(requests, rows.starts[:-1], strict=True):
                b = r.x.shape[0]
                result.append(host[int(s) : int(s) + r.rows].reshape(r.samples, b, *g.output_shape))
        return result


def default_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
