"""Noise that grows with x: a learned noise head's intervals follow it, a fixed noise's cannot.

Data: x ~ U(0, 1), y = 2 x + s(x) e with s(x) = 0.1 * 10^x (0.1 to 1, log-linear so a ReLU
net represents it). Two MC-dropout nets are trained on the same rows: one with a log-variance
head by the Gaussian NLL, one by squared error with the fixed noise variance of its training
residuals. Both are served as bundles; quantile intervals (sampled from the predictive mixture)
at 80 and 95 % are checked per x-bin on fresh rows. Tolerance: 3 binomial standard deviations
of the coverage of n rows, sqrt(level (1 - level) / n).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from service.bundle import load_bundle
from service.engine.model import ServedModel
from service.engine.params import PredictParams
from service.packaging import save

BINS, PER_BIN, LEVELS = 5, 1000, (0.8, 0.95)


def _data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.0, 1.0, n)
    y = 2.0 * x + 0.1 * np.exp(math.log(10.0) * x) * rng.standard_normal(n)
    return x.astype(np.float32)[:, None], y.astype(np.float32)


def _net(outputs: int) -> nn.Module:
    p = 0.01
    return nn.Sequential(
        nn.Linear(1, 32),
        nn.ReLU(),
        nn.Dropout(p),
        nn.Linear(32, 32),
        nn.ReLU(),
        nn.Dropout(p),
        nn.Linear(32, outputs),
    )


def _train(learned: bool, x: np.ndarray, y: np.ndarray) -> tuple[nn.Module, float | None]:
    torch.manual_seed(1)
    gen = torch.Generator().manual_seed(1)
    net = _net(2 if learned else 1)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    steps = 4000
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(steps):
        idx = torch.randint(0, len(xt), (256,), generator=gen)
        out = net(xt[idx])
        r2 = (yt[idx] - out[:, 0]).square()
        # Gaussian NLL with s^2 = exp(v), constants dropped; squared error for the fixed noise.
        loss = (0.5 * (out[:, 1] + r2 * torch.exp(-out[:, 1]))).mean() if learned else r2.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    if learned:
        return net.eval(), None
    with torch.no_grad():
        resid = net.eval()(xt)[:, 0] - yt
    return net, float(resid.square().mean())


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ServedModel]:
    torch.set_num_threads(1)  # the nets are tiny; several threads only contend on a shared host
    x, y = _data(8000, 0)
    root = tmp_path_factory.mktemp("noise")
    out = {}
    for kind in ("learned", "fixed"):
        net, noise_var = _train(kind == "learned", x, y)
        dest = save(
            net,
            torch.from_numpy(x[:4]),
            out_dir=root,
            name=kind,
            version="1",
            task="regression",
            intended_use="tests only",
            target="y",
            noise_var=noise_var,
            variance="log_variance" if kind == "learned" else None,
        )
        out[kind] = ServedModel(load_bundle(dest), device="cpu")
    return out


def _per_bin(model: ServedModel) -> tuple[np.ndarray, np.ndarray]:
    """Coverage and mean width per x-bin and level: [levels, bins] each."""
    x, y = _data(BINS * PER_BIN, 5)
    cover, width = np.zeros((2, BINS)), np.zeros((2, BINS))
    hits = np.zeros((2, len(x)), dtype=bool)
    widths = np.zeros((2, len(x)))
    for start in range(0, len(x), 500):  # 500 rows x 4,000 mixture draws per summary
        rows = slice(start, start + 500)
        pred = model.predict(x[rows], PredictParams(100, LEVELS, seed=start, interval="quantile"))
        for i, iv in enumerate(pred.summary.intervals):
            hits[i, rows] = (iv.lower[:, 0] <= y[rows]) & (y[rows] <= iv.upper[:, 0])
            widths[i, rows] = iv.upper[:, 0] - iv.lower[:, 0]
    bins = np.minimum((x[:, 0] * BINS).astype(int), BINS - 1)
    for b in range(BINS):
        cover[:, b] = hits[:, bins == b].mean(axis=1)
        width[:, b] = widths[:, bins == b].mean(axis=1)
    assert np.bincount(bins).min() > 0.8 * PER_BIN
    return cover, width


def test_learned_noise_intervals_widen_with_x_and_cover_per_bin(
    served: dict[str, ServedModel],
) -> None:
    cover, width = _per_bin(served["learned"])
    n = PER_BIN * 0.8  # the smallest bin, conservatively
    for i, level in enumerate(LEVELS):
        tol = 3 * math.sqrt(level * (1 - level) / n)
        assert np.all(np.abs(cover[i] - level) < tol), (level, cover[i], tol)
        # The noise grows tenfold over x; the widths follow (each bin wider than the last).
        assert np.all(np.diff(width[i]) > 0), width[i]
        assert width[i, -1] > 3 * width[i, 0]


def test_fixed_noise_intervals_do_not_follow_the_noise(served: dict[str, ServedModel]) -> None:
    cover, width = _per_bin(served["fixed"])
    n = PER_BIN * 0.8
    for i, level in enumerate(LEVELS):
        tol = 3 * math.sqrt(level * (1 - level) / n)
        # Too wide where the noise is small, too narrow where it is large.
        assert cover[i, 0] - level > tol and level - cover[i, -1] > tol, (level, cover[i])
        assert width[i, -1] < 1.5 * width[i, 0]
