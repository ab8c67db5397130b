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


@pytest.mark.parametrize("make", [SeqFirst, PositionTable, Flattened])
def test_a_prefix_linear_off_the_first_axis_computes_every_row(make: type[nn.Module]) -> None:
    torch.manual_seed(0)
    module = make().eval()
    x = np.random.default_rng(0).integers(1, V, (6, L))
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
