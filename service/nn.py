"""Layers mcserve adds to the whitelist of declarative architectures (no code in bundles)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn


class Affine(nn.Module):
    """y = (x - shift) / scale: input standardisation or output de-standardisation baked in."""

    shift: torch.Tensor
    scale: torch.Tensor

    def __init__(self, features: int) -> None:
        super().__init__()
        self.features = features
        self.register_buffer("shift", torch.zeros(features))
        self.register_buffer("scale", torch.ones(features))

    @classmethod
    def of(cls, shift: torch.Tensor, scale: torch.Tensor) -> Affine:
        m = cls(int(shift.numel()))
        m.shift.copy_(shift.reshape(-1))
        m.scale.copy_(scale.reshape(-1))
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale


class VariationalDropout(nn.Dropout):
    """Dropout with one mask per sequence, shared over time (Gal & Ghahramani 2016).

    Input batch-first ``[B, L, *features]``: in training each sequence draws one mask over its
    features and every time step uses it (``[B, 1, *features]``, broadcast over ``L``), as
    "locked" dropout does on an RNN's inputs and outputs (embeddings, between stacked layers).
    In eval it is the identity. In a bundle the MC engine samples it the same way, one mask per
    sequence and pass (docs/BUNDLES.md, "Variational dropout"). Only ``shared_over="time"``:
    the hidden-to-hidden mask of Gal & Ghahramani's full variant needs a cell loop that a
    bundle does not hold (torch's LSTM/GRU run their steps in one kernel).
    """

    def __init__(self, p: float = 0.5, shared_over: str = "time") -> None:
        if shared_over != "time":
            raise ValueError(
                f"VariationalDropout(shared_over={shared_over!r}): only 'time' is supported (one "
                "mask per sequence on a [B, L, features] tensor); recurrent (hidden-to-hidden) "
                "dropout is not, since a bundle runs LSTM/GRU steps in torch's fused kernel"
            )
        super().__init__(p)
        self.shared_over: Literal["time"] = "time"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.dim() < 3:
            raise ValueError(
                f"VariationalDropout takes [B, L, features] (batch first), got {list(x.shape)}"
            )
        keep = x.new_empty((x.shape[0], 1, *x.shape[2:])).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}, shared_over={self.shared_over!r}"


LockedDropout = VariationalDropout  # the name AWD-LSTM's code uses for the same thing
