"""Architecture descriptions load in every torch of the supported range (2.11 to 2.15).

Found on a GPU machine with torch 2.11: a bundle written by torch 2.13 recorded BatchNorm's
`bias=True`, an argument torch 2.11's constructor does not take. Descriptions now leave out
arguments equal to their defaults, so an older constructor builds the same layer.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from nets import SmallCNN
from torch import fx, nn

from service.bundle import architecture


class BatchNorm2dTorch211(nn.BatchNorm2d):
    """BatchNorm2d with torch 2.11's constructor signature (no `bias`)."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)


def test_defaults_are_not_recorded() -> None:
    gm = fx.symbolic_trace(SmallCNN())
    desc = architecture.describe(gm)
    for qual, spec in desc["modules"].items():
        params = inspect.signature(type(gm.get_submodule(qual)).__init__).parameters
        for name, encoded in spec["args"].items():
            default = params[name].default
            assert default is inspect.Parameter.empty or encoded != default, (qual, name)
    assert "bias" not in desc["modules"]["bn"]["args"]


def test_description_loads_with_an_older_constructor(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    net = SmallCNN().eval()
    gm = fx.symbolic_trace(net)
    desc = architecture.describe(gm)
    assert any(spec["type"] == "BatchNorm2d" for spec in desc["modules"].values())
    monkeypatch.setitem(architecture.MODULES, "BatchNorm2d", BatchNorm2dTorch211)
    rebuilt = architecture.rebuild(desc, gm.state_dict()).eval()
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(rebuilt(x), gm(x))


def test_non_default_arguments_are_kept() -> None:
    gm = fx.symbolic_trace(nn.Sequential(nn.Linear(4, 3, bias=False), nn.Dropout(0.2)))
    desc = architecture.describe(gm)
    assert desc["modules"]["0"]["args"]["bias"] is False
    assert desc["modules"]["1"]["args"]["p"] == 0.2
