"""Models the split would serve wrongly, refused with a reason, and inputs it pads with: a
reviewer's cases (service/engine/dataflow.py, masks.KeepRule, sampler padding)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from service.bundle import load_bundle
from service.engine import MCRequest, MCSampler
from service.engine.model import ServedModel
from service.errors import ModelError
from service.packaging import save
from service.packaging.tracer import trace_with_shapes


class Channel(nn.Module):
    def __init__(self, drop: nn.Module, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape, self.drop, self.fc = shape, drop, nn.LazyLinear(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(x.reshape(x.shape[0], *self.shape)).flatten(1))


@pytest.mark.parametrize(
    ("drop", "shape", "refused"),
    [
        (nn.Dropout1d(0.3), (16,), True),  # [B, F]: torch zeroes whole inputs
        (nn.Dropout3d(0.3), (4, 2, 2), True),  # [B, C, H, W]: likewise
        (nn.Dropout1d(0.3), (4, 4), False),  # [B, C, L]: per channel, as served
        (nn.Dropout3d(0.3), (2, 2, 2, 2), False),
    ],
)
def test_channel_dropout_on_an_unbatched_rank_is_refused(
    drop: nn.Module, shape: tuple[int, ...], refused: bool
) -> None:
    module = Channel(drop, shape)
    x = torch.randn(4, 16)
    module(x)  # materialise the lazy layer
    if not refused:
        MCSampler(module.eval(), x, device="cpu")
        return
    with pytest.raises(ModelError, match=r"torch reads it as unbatched and zeroes whole inputs"):
        MCSampler(module.eval(), x, device="cpu")


class ReluAlias(nn.Module):
    def __init__(self, reread: bool) -> None:
        super().__init__()
        self.reread = reread
        self.fc1, self.drop, self.act = nn.Linear(8, 16), nn.Dropout(0.3), nn.ReLU(inplace=True)
        self.fc2, self.fc3 = nn.Linear(16, 3), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(self.fc1(x)) * 1.0
        a = self.act(h)
        return self.fc2(a + 1.0) + (self.fc3(h) if self.reread else 0.0)


def test_an_in_place_change_of_a_value_read_elsewhere_is_refused() -> None:
    """The sampler runs the prefix before the suffix and rewrites some operations in place: an
    in-place ReLU of a tensor another layer reads served a mean 214 standard errors off."""
    x = torch.randn(4, 8)
    with pytest.raises(ModelError, match=r"node 'act' changes 'mul' in place, which \['fc3'\]"):
        MCSampler(ReluAlias(reread=True).eval(), x, device="cpu")
    MCSampler(ReluAlias(reread=False).eval(), x, device="cpu")  # its only reader: fine


def test_a_rate_that_drops_nothing_once_quantised_is_refused() -> None:
    """p < 1/512 rounds to keeping every unit: a spread of exactly 0, said nowhere."""
    module = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.001), nn.Linear(8, 2)).eval()
    with pytest.raises(ModelError, match=r"dropout rate 0.001 drops no unit once quantised"):
        MCSampler(module, torch.randn(2, 4), device="cpu")
    MCSampler(nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.002), nn.Linear(8, 2)).eval(),
              torch.randn(2, 4), device="cpu")  # fmt: skip


class GatherLast(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.drop, self.fc = nn.Embedding(20, 16), nn.Dropout(0.2), nn.Linear(16, 3)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        last = ((t != 0).sum(1) - 1).view(-1, 1, 1).expand(-1, 1, 16)
        return self.fc(self.drop(self.emb(t).gather(1, last).squeeze(1)))


def test_padding_inputs_are_copies_not_zeros(tmp_path: Path) -> None:
    """An all-padding row made this model's index -1: save() accepted it, loading it failed
    (the split's example was zeros) and a lone input failed (padded with zero rows)."""
    x = np.random.default_rng(0).integers(1, 20, (4, 6))
    x[0, 4:] = 0
    torch.manual_seed(0)
    module = GatherLast().eval()
    path = save(module, torch.as_tensor(x), out_dir=tmp_path, name="g", version="1",
                task="regression", intended_use="tests only", target=["a", "b", "c"],
                noise_var=0.01)  # fmt: skip
    served = ServedModel(load_bundle(path))
    lone = served.sampler.run([MCRequest(x[:1], 10, 1)])[0]
    shared = served.sampler.run([MCRequest(x[1:], 3, 2), MCRequest(x[:1], 10, 1)])[1]
    assert np.array_equal(lone, shared)
    sampler = MCSampler(trace_with_shapes(module, torch.as_tensor(x[:2])), torch.as_tensor(x[:2]))
    assert sampler.run([MCRequest(x[:1], 10, 1)])[0].shape == (10, 1, 3)
