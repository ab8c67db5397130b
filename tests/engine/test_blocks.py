"""Seeded samples keep their bits whatever shares the forward, however it is chunked, and on any
thread count: linear layers in fixed row blocks, requests at block starts (engine/blocks.py).

The in-process tests run on whatever kernels the libraries dispatch here; test_instruction_sets.py
runs this file again under forced instruction-set settings, where the old row layout failed."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from nets import Residual, SmallCNN, mlp, trained_bn
from torch import nn

from service.engine import MCRequest, MCSampler
from service.engine.blocks import BLOCK_ROWS, block_linears, blocked_linear, live_rows
from service.engine.graph import split
from service.engine.rows import layout


@pytest.fixture
def threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_blocked_linear_is_linear_to_rounding_and_each_block_is_the_same_computation() -> None:
    g = torch.Generator().manual_seed(0)
    for features in (64, 1):  # one output feature: a batch of one block took other code
        w, b = torch.randn(features, 30, generator=g), torch.randn(features, generator=g)
        x = torch.randn(10 * BLOCK_ROWS, 30, generator=g)
        whole = blocked_linear(x, w, b, BLOCK_ROWS)
        assert torch.allclose(whole, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
        for start, blocks in ((0, 1), (3, 1), (2, 5), (9, 1), (0, 2)):
            rows = slice(start * BLOCK_ROWS, (start + blocks) * BLOCK_ROWS)
            assert torch.equal(blocked_linear(x[rows].clone(), w, b, BLOCK_ROWS), whole[rows])
    # Blocks of one input (the prefix): each the same whatever their number, and with live_rows
    # only the rows read are computed.
    w1, b1 = torch.randn(128, 512, generator=g), torch.randn(128, generator=g)
    x1 = torch.randn(300, 512, generator=g)
    whole = blocked_linear(x1, w1, b1, 1)
    for n in (1, 2, 3, 64, 299):
        assert torch.equal(blocked_linear(x1[:n].clone(), w1, b1, 1), whole[:n])
        with live_rows(n):
            lively = blocked_linear(x1[:64], w1, b1, 1, 0, 1)
        assert torch.equal(lively[: min(n, 64)], whole[: min(n, 64)])
        assert not lively[n:].any()
    # Not a whole number of blocks (never in the sampler): a plain linear.
    assert torch.equal(blocked_linear(x[:65], w, b, BLOCK_ROWS), F.linear(x[:65], w, b))
    assert torch.allclose(blocked_linear(x[:65], w, None, 1), x[:65] @ w.t(), rtol=1e-5, atol=1e-5)


def test_every_linear_of_a_graph_is_rewritten() -> None:
    for model, shape, linears in ((mlp(0.25), (6,), 3), (FunctionalLinear(), (6,), 2)):
        g = split(model.eval(), torch.zeros(2, *shape))
        assert sum(1 for v in g.linear_rows.values() if v == (0, 1, True)) == linears
        assert block_linears(g.prefix, 1, g.linear_rows, prefix=True) == 0
        assert block_linears(g.suffix, BLOCK_ROWS, g.linear_rows, prefix=False) == 0
        for gm in (g.prefix, g.suffix):
            assert not any(
                (n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), nn.Linear))
                or (n.op == "call_function" and n.target is F.linear)
                for n in gm.graph.nodes
            )


def test_layout_starts_each_request_at_a_block_boundary() -> None:
    plain_rows, plain_base, _ = layout(((100, 1, 0), (3, 2, 0)), torch.device("cpu"))
    rows, base, req = layout(((100, 1, 0), (3, 2, 0)), torch.device("cpu"), BLOCK_ROWS)
    assert rows.shape[0] == 2 * BLOCK_ROWS + BLOCK_ROWS  # 100 -> 128 rows, 6 -> 64
    assert req.tolist() == [0] * 128 + [1] * 64
    # Real rows as before; padding rows repeat the request's first row.
    assert torch.equal(rows[:100], plain_rows[:100]) and torch.equal(base[:100], plain_base[:100])
    assert torch.equal(rows[128:134], plain_rows[100:]) and torch.equal(
        base[128:134], plain_base[100:]
    )
    assert set(rows[100:128].tolist()) == {0} and set(rows[134:].tolist()) == {1}
    assert set(base[100:128].tolist()) == {0} and set(base[134:].tolist()) == {0}
    # A turn of passes 60-99 (turns.py) has the masks of those passes of the whole request.
    _, turn, _ = layout(((40, 1, 60),), torch.device("cpu"), BLOCK_ROWS)
    assert torch.equal(turn[:40], plain_base[60:100])


class FunctionalLinear(nn.Module):
    """Linear layers called as F.linear, one before and one after the dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.w1, self.w2 = nn.Parameter(torch.randn(16, 6)), nn.Parameter(torch.randn(3, 16))
        self.drop = nn.Dropout(0.25)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.drop(torch.relu(F.linear(x, self.w1))), self.w2)


MODELS = [
    (lambda: mlp(0.25, d_in=30, hidden=64), (30,)),
    (lambda: trained_bn(SmallCNN(0.5), (1, 8, 8)), (1, 8, 8)),
    (lambda: Residual(), (6,)),
    (lambda: FunctionalLinear(), (6,)),
]


@pytest.mark.parametrize("make, shape", MODELS, ids=["mlp", "cnn", "residual", "functional"])
def test_seeded_samples_do_not_depend_on_batch_chunks_or_threads(make, shape, threads) -> None:
    torch.manual_seed(0)
    model = make()
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(1 + i % 3, *shape, generator=gen).numpy() for i in range(12)]
    reqs = [MCRequest(x, 100, 100 + i) for i, x in enumerate(xs)]
    chunked = MCSampler(copy.deepcopy(model), torch.as_tensor(xs[0]), row_budget=3 * BLOCK_ROWS)
    sampler = MCSampler(model, torch.as_tensor(xs[0]), device="cpu")
    torch.set_num_threads(1)
    alone = [sampler.run([r])[0] for r in reqs]
    torch.set_num_threads(2)  # two threads split each forward (also on a one-core machine)
    together = sampler.run(reqs)
    in_chunks = chunked.run(reqs[::-1])[::-1]
    for i, (a, b, c) in enumerate(zip(alone, together, in_chunks, strict=True)):
        assert np.array_equal(a, b), f"request {i}: alone on 1 thread != shared on 2"
        assert np.array_equal(a, c), f"request {i}: alone != in chunks of {3 * BLOCK_ROWS} rows"
