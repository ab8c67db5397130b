"""Layers mcserve adds to the whitelist of declarative architectures (no code in bundles)."""

from __future__ import annotations

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
