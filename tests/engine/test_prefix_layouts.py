"""Linear layers of the prefix whose input does not hold the batch on its first axis: a
seq-first [L, B, d] encoder, a [L, d] position table through a linear, tokens flattened into
[B * L, d] rows. The prefix computed only the first B rows of each (its real inputs' rows when
dim 0 is the batch), the rest zeros: a request's answer was wrong, and other alone than shared
(a reviewer's: 0.2 apart in the logits, MC means far from the eval-mode answer). Each linear is
now blocked along the axis that holds the batch (blocks.row_layout), or left plain."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from service.engine import MCRequest, MCSampler
from service.packaging.tracer import trace_with_shapes

V, L = 50, 12


class SeqFirst(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.proj = nn.Embedding(V, 16), nn.Linear(16, 16)
        self.drop, self.fc = nn.Dropout(0.2), nn.Linear(16, 3)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.proj(self.emb(t).transpose(0, 1)))  # [L, B, 16]
        return self.fc(self.drop(x.mean(0)))


class PositionTable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.pos, self.pp = nn.Embedding(V, 16), nn.Embedding(L, 16), nn.Linear(16, 16)
        self.drop, self.fc = nn.Dropout(0.2), nn.Linear(16, 3)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        p = self.pp(self.pos(torch.arange(t.size(1))))  # [L, 16]: no batch in it
        return self.fc(self.drop((self.emb(t) + p).mean(1)))


class Flattened(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.proj = nn.Embedding(V, 16), nn.Linear(16, 16)
        self.drop, self.fc = nn.Dropout(0.2), nn.Linear(16, 3)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.proj(self.emb(t).reshape(-1, 16)))  # [B * L, 16]
        return self.fc(self.drop(x.reshape(t.shape[0], t.shape[1], 16).mean(1)))


class Siamese(nn.Module):
    """One encoder over both halves of each input: torch.cat([x[:, 0], x[:, 1]]) holds 2B rows,
    the shapes of 2-row blocks per input but not their rows (input i's are i and B + i)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc, self.drop, self.fc = nn.Linear(8, 16), nn.Dropout(0.2), nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        h = torch.relu(self.enc(torch.cat([x[:, 0], x[:, 1]], 0)))  # [2B, 16]
        return self.fc(self.drop(torch.cat([h[:b], h[b:]], 1)))


class SeqFirstFlattened(nn.Module):
    """Tokens flattened seq-first: row j * B + i is token j of input i."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.proj = nn.Embedding(V, 16), nn.Linear(16, 16)
        self.drop, self.fc = nn.Dropout(0.2), nn.Linear(16, 3)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        e = self.emb(t).transpose(0, 1).reshape(-1, 16)  # [L * B, 16]
        x = torch.relu(self.proj(e)).reshape(t.shape[1], t.shape[0], 16)
        return self.fc(self.drop(x.mean(0)))


class LastToken(nn.Module):
    """Last-token pooling, h[arange(B), last]: the arange is made from the batch's size, so it
    is recomputed in the suffix (gathered from the prefix, its numbers indexed the suffix's
    pass x input rows: every pass served pass 0's row, a spread of exactly 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.drop, self.fc = nn.Embedding(V, 16), nn.Dropout(0.2), nn.Linear(16, 3)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        last = (t != 0).sum(1) - 1
        h = self.drop(self.emb(t))
        return self.fc(h[torch.arange(t.shape[0]), last])


MODELS = [SeqFirst, PositionTable, Flattened, Siamese, SeqFirstFlattened, LastToken]


def _inputs(make: type[nn.Module]) -> np.ndarray:
    rng = np.random.default_rng(0)
    if make is Siamese:
        return rng.standard_normal((6, 2, 8)).astype(np.float32)
    x = rng.integers(1, V, (6, L))
    x[1, 7:] = 0  # a shorter text (LastToken reads its own last token)
    return x


@pytest.mark.parametrize("make", MODELS)
def test_a_prefix_linear_off_the_first_axis_computes_every_row(make: type[nn.Module]) -> None:
    torch.manual_seed(0)
    module = make().eval()
    x = _inputs(make)
    example = torch.as_tensor(x[:4])
    sampler = MCSampler(trace_with_shapes(module, example), example, device="cpu")
    request = MCRequest(x[:1], 2000, 7)
    alone = sampler.run([request])[0]
    shared = sampler.run([MCRequest(x[1:6], 2, 9), request])[1]
    assert np.array_equal(alone, shared)
    # Dropout right before the last linear layer: the mean over masks is the eval-mode answer
    # (inverted dropout: E[mask * scale] = 1 exactly), within 5 Monte Carlo standard errors.
    with torch.inference_mode():
        want = module(torch.as_tensor(x[:1])).numpy()[0]
    mean, se = alone[:, 0].mean(0), alone[:, 0].std(0, ddof=1) / np.sqrt(alone.shape[0])
    assert (np.abs(mean - want) <= 5 * se).all(), (mean, want, se)


class LearnedStart(nn.Module):
    """A learned initial state, init(x.new_zeros(B, d)): the same for every input, so no
    change shows which rows are whose; it is still blocked per input (left plain, its rounding
    could follow the forward's row count), with no row left uncomputed."""

    def __init__(self) -> None:
        super().__init__()
        self.init, self.body = nn.Linear(8, 8), nn.Linear(4, 8)
        self.drop, self.fc = nn.Dropout(0.2), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        start = self.init(x.new_zeros(x.shape[0], 8))
        return self.fc(self.drop(self.body(x) + start))


def test_a_linear_of_values_no_input_changes_is_blocked_without_skipping_rows() -> None:
    from service.engine.graph import split

    module = LearnedStart().eval()
    g = split(module, torch.randn(2, 4))
    assert g.linear_rows["init"] == (0, 1, False)
    assert g.linear_rows["body"] == (0, 1, True)
    x = np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32)
    sampler = MCSampler(module, torch.as_tensor(x[:2]), device="cpu")
    alone = sampler.run([MCRequest(x[:1], 200, 3)])[0]
    shared = sampler.run([MCRequest(x[1:], 7, 4), MCRequest(x[:1], 200, 3)])[1]
    assert np.array_equal(alone, shared)


class LearnedQueries(nn.Module):
    """Learned queries expanded to the batch and through an MLP (DETR/Perceiver style), read
    after the dropout: the same for every input, so carried over from the prefix once per input
    (recomputed per pass x input row, four linears cost 17 times as much)."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Parameter(torch.randn(4, 8))
        self.mlp = nn.Sequential(*(nn.Linear(8, 8) for _ in range(4)))
        self.inp, self.drop, self.out = nn.Linear(8, 8), nn.Dropout(0.2), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.mlp(self.q.expand(x.shape[0], 4, 8))
        return self.out((self.drop(self.inp(x)).unsqueeze(1) * q).sum(1))


def test_float_values_made_from_sizes_stay_in_the_prefix() -> None:
    from service.engine.graph import split

    g = split(LearnedQueries().eval(), torch.randn(2, 8))
    suffix = g.suffix.code
    assert "frontier_mlp_3" in suffix and "mlp_0" not in suffix, suffix  # its value, carried
