"""Tiny dropout models shared by the tests (built in fixtures, never loaded from disk)."""

from __future__ import annotations

import torch
from torch import nn


def mlp(p: float = 0.25, d_in: int = 6, hidden: int = 32, d_out: int = 2) -> nn.Module:
    return nn.Sequential(
        nn.Linear(d_in, hidden),
        nn.ReLU(),
        nn.Dropout(p),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Dropout(p),
        nn.Linear(hidden, d_out),
    )


class SmallCNN(nn.Module):
    """Conv + BatchNorm trunk, dropout only in the head (the prefix does the convolutions)."""

    def __init__(self, p: float = 0.5, classes: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(4 * 4 * 4, 16)
        self.drop = nn.Dropout(p)
        self.head = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(torch.relu(self.bn(self.conv(x))))
        h = torch.relu(self.fc(h.view(h.size(0), -1)))
        return self.head(self.drop(h))


class ChannelCNN(nn.Module):
    """Dropout2d between convolutions: whole channels are dropped."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout2d(0.5)
        self.c2 = nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c2(self.drop(torch.relu(self.bn(self.c1(x)))))
        return h.flatten(1).mean(dim=1, keepdim=True)


class Residual(nn.Module):
    """A skip connection around the dropout and a branch that never sees dropout."""

    def __init__(self, d: int = 6, h: int = 16) -> None:
        super().__init__()
        self.inp = nn.Linear(d, h)
        self.norm = nn.LayerNorm(h)
        self.drop = nn.Dropout(0.25)
        self.body = nn.Linear(h, h)
        self.side = nn.Linear(d, h)
        self.out = nn.Linear(h, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.relu(self.norm(self.inp(x)))
        z = z + self.body(self.drop(z))  # residual: z itself skips the dropout
        return self.out(torch.relu(z + self.side(x)))


class FunctionalDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(nn.functional.dropout(x, 0.5, self.training))


def trained_bn(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """Give BatchNorm non-trivial running statistics, then freeze it."""
    model.train()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _ in range(5):
            model(torch.randn(32, *shape, generator=g) * 2 + 1)
    return model.eval()


# The four shapes of graph the sampler must handle (parametrised tests take them all).
FOUR_MODELS = [
    (lambda: mlp(0.25), (6,)),
    (lambda: trained_bn(SmallCNN(0.5), (1, 8, 8)), (1, 8, 8)),
    (lambda: Residual(), (6,)),
    (lambda: trained_bn(ChannelCNN(), (1, 8, 8)), (1, 8, 8)),
]
FOUR_MODEL_IDS = ["mlp", "cnn-bn", "residual", "dropout2d"]


def coin_net() -> nn.Module:
    """Two classes; logit 0 = (units 0-7) - (units 8-15) of relu(+-x + 1) after dropout 0.5.

    At x = 10 only the first 8 units are on: class 0 in nearly every pass (easy). At x = 0 all 16
    are on with equal weight: the logit's sign is a coin flip per pass, the mean gap between the
    classes stays within a few standard errors of 0 however many passes (hard)."""
    net = nn.Sequential(nn.Linear(1, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0]] * 8 + [[-1.0]] * 8))
        net[0].bias.fill_(1.0)
        net[3].weight.zero_()
        net[3].weight[0].copy_(torch.tensor([1.0] * 8 + [-1.0] * 8))
        net[3].bias.zero_()
    return net
