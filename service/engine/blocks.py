"""Linear layers in fixed-size row blocks: a row's rounding does not depend on its forward.

A CPU matrix product (MKL's sgemm under torch) rounds a row by the kernel that covers it, and
which kernel that is depends on the forward's row count, on where the row sits and on how the
threads split the rows (the tails of the kernel's blocks and of each thread's share take other
code). Measured (issue 23): on an AVX-512 Xeon a 300-row forward's rows 148-149 and 298 differ
from the same rows inside a 4,800-row forward; on an AMD EPYC with `MKL_CBWR=COMPATIBLE`, 4
rows of a 100- or 300-row forward on two threads, and one row of a 65-row forward on one.

Here each linear layer instead runs as a batch of identical products of `rows` rows each
(`baddbmm` over `[n / rows, rows, in]`: one MKL `sgemm_batch` call; `python -m bench.blocks`:
from 64 rows per block within 7 % of one `linear` at the engine benchmark's layers, up to 30 %
slower for small layers such as 64->64 over 1,600 rows): every block is the same computation
whatever the forward's size and whichever thread takes it, so a row's bits depend only on its
own input row. Measured
(2026-12-06, AMD EPYC, default kernels, `MKL_CBWR=COMPATIBLE` and `ATEN_CPU_CAPABILITY=default`;
1, 2 and 4 threads; 2 to 300 blocks): every block the same bits at every index. A batch of one
block is the exception: torch hands it to plain `sgemm`, whose rounding differs (seen for one
output feature), so it is computed as two.

The sampler puts each request at a block start (sampler.py), so a request's rows meet the same
code alone or in any batch. Only the sampler's graphs are rewritten; a forward whose rows are
not a whole number of blocks takes a plain `linear` (never in the sampler).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

# Rows per block of the stochastic suffix on the CPU (the prefix uses blocks of one input).
BLOCK_ROWS = 64

# Rows whose values are read, where a forward is padded further (the prefix: to 64 inputs for
# its convolutions, see sampler.py): blocks of one row past them are not computed (zeros).
# Measured: the digits prefix's Linear(512, 128) over 64 inputs in blocks of one, 187 us against
# 91 us for one `linear`, for a request of one input.
_live: ContextVar[int | None] = ContextVar("live_rows", default=None)


@contextlib.contextmanager
def live_rows(n: int) -> Iterator[None]:
    """Within this block, blocked linears of one-row blocks compute only the first n rows."""
    token = _live.set(n)
    try:
        yield
    finally:
        _live.reset(token)


def blocked_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rows: int,
    axis: int = 0,
    live_unit: int = 0,
) -> torch.Tensor:
    """F.linear(x, weight, bias), computed as identical products of `rows` rows each, the rows
    counted along `axis` (where the input holds the batch: a seq-first [L, B, d] has it at 1).
    `live_unit`: in the prefix, the rows each input holds along that axis (`live_rows`)."""
    if axis:
        moved = blocked_linear(x.movedim(axis, 0), weight, bias, rows, 0, live_unit)
        return moved.movedim(0, axis)
    n = x.shape[0]
    if x.dim() < 2 or n == 0 or n % rows or x.device.type != "cpu":
        return F.linear(x, weight, bias)
    live = _live.get() if live_unit else None  # the suffix (compiled or not) never reads it
    if live is not None and 0 < live * live_unit < n:
        out = x.new_zeros((*x.shape[:-1], weight.shape[0]))
        out[: live * live_unit] = blocked_linear(x[: live * live_unit], weight, bias, rows)
        return out
    blocks = n // rows
    xb = x.reshape(blocks, -1, x.shape[-1])
    if blocks == 1:  # torch sends a batch of one to plain sgemm, other code: make it two
        xb = torch.cat([xb, torch.zeros_like(xb)])
    wt = weight.t().expand(xb.shape[0], -1, -1)  # one weight read by every block (stride 0)
    out = torch.bmm(xb, wt) if bias is None else torch.baddbmm(bias, xb, wt)
    return out[:blocks].reshape(*x.shape[:-1], weight.shape[0])


torch.fx.wrap("blocked_linear")


def replace_nodes(
    gm: fx.GraphModule, make: Callable[[fx.GraphModule, fx.Node], fx.Node | None]
) -> int:
    """Replace each node for which `make` (called with the graph inserting before that node)
    returns a new node; recompile once. Returns how many were replaced."""
    count = 0
    for node in list(gm.graph.nodes):
        with gm.graph.inserting_before(node):
            new = make(gm, node)
        if new is None:
            continue
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count


# Per linear layer (by node name): where its input holds the batch, as (axis, rows per input
# along it, whether those rows are known to be the input's own); (0, 0, True) for an input the
# batch does not change (a position table); None where no one axis holds it (then no block can
# be tied to inputs).
Layout = dict[str, tuple[int, int, bool] | None]


def row_layout(
    gm: fx.GraphModule,
    v2: dict[fx.Node, Any],
    v3: dict[fx.Node, Any],
    v3x: dict[fx.Node, Any],
) -> Layout:
    """Each linear layer's `Layout` entry, read from its input's values at batch 2 and 3 and at
    batch 3 with input 2 changed (`v3x`, dataflow.perturbed): an axis holds k rows per input
    when it grows from 2k to 3k rows and input 2's change lands in rows [2k, 3k) of it alone
    (a seq-first [L, B, d], flattened [B * L, d] tokens; a reviewer's prefixes computed only
    the first B rows of those, the rest zeros; a Siamese torch.cat([x[:, 0], x[:, 1]]) has the
    shapes of [2B, d] blocks but not their rows)."""
    out: Layout = {}
    for node in gm.graph.nodes:
        parts = _linear_parts(gm, node)
        a, b, c = (v.get(parts[0]) if parts else None for v in (v2, v3, v3x))
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            continue
        if a.shape == b.shape:
            out[node.name] = (0, 0, True)
            continue
        out[node.name] = _tied(a, b, c)
    return out


def _tied(a: torch.Tensor, b: torch.Tensor, c: Any) -> tuple[int, int, bool] | None:
    grown = [i for i in range(a.dim() - 1) if a.dim() == b.dim() and a.shape[i] != b.shape[i]]
    if len(grown) != 1 or not isinstance(c, torch.Tensor) or c.shape != b.shape:
        return None
    i = grown[0]
    k = a.shape[i] // 2
    if k == 0 or a.shape[i] != 2 * k or b.shape[i] != 3 * k:
        return None
    changed = b != c
    if b.dtype.is_floating_point:  # a NaN in both is no change
        changed &= ~(b.isnan() & c.isnan())
    rows = changed.movedim(i, 0).reshape(b.shape[i], -1).any(dim=1).nonzero().flatten()
    if rows.numel() == 0:  # the same for every input's values (a learned initial state of
        return i, k, False  # zeros [B, d]): blocks of k rows, none of them left uncomputed
    if int(rows.min()) < 2 * k:  # spread over other inputs' rows
        return None
    return i, k, True


def _linear_parts(gm: fx.GraphModule, node: fx.Node) -> tuple[Any, Any, Any] | None:
    """(input, weight, bias) of a linear layer's node (an nn.Linear or F.linear), else None;
    the weight and bias of a module as the module's own tensors."""
    if node.op == "call_module" and type(gm.get_submodule(str(node.target))) is nn.Linear:
        if len(node.args) != 1 or node.kwargs:
            return None
        linear = gm.get_submodule(str(node.target))
        return node.args[0], linear.weight, linear.bias
    if node.op == "call_function" and node.target is F.linear:
        args = list(node.args) + [None] * (3 - len(node.args))
        return args[0], node.kwargs.get("weight", args[1]), node.kwargs.get("bias", args[2])
    return None


def block_linears(gm: fx.GraphModule, rows: int, layout: Layout, *, prefix: bool) -> int:
    """Rewrite the graph's linear layers (nn.Linear modules and F.linear calls) into
    `blocked_linear`, in place: blocks of `rows` inputs' rows (`rows` rows of the suffix), along
    the axis `layout` gives. A layer the batch does not reach stays a plain linear (the same
    product every time); returns how many layers no block could be tied to (left plain: their
    rounding may follow the batch)."""
    untied = 0

    def make(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
        nonlocal untied
        parts = _linear_parts(gm, node)
        if parts is None:
            return None
        entry = layout.get(node.name)
        if entry is None:
            untied += 1
            return None
        axis, per_input, owned = entry
        if per_input == 0:
            return None
        x, w, b = parts
        if node.op == "call_module":
            w = gm.graph.get_attr(f"{node.target}.weight")
            b = gm.graph.get_attr(f"{node.target}.bias") if b is not None else None
        unit = per_input if prefix and owned else 0  # rows past the live inputs' left at 0
        args = (x, w, b, rows * per_input, axis, unit)
        return gm.graph.call_function(blocked_linear, args)

    replace_nodes(gm, make)
    return untied
