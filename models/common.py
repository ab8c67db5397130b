"""Shared pieces of the bundled-model recipes: determinism, splits, fingerprints, MC metrics.

Everything here is deterministic on one machine: seeds are explicit, training runs on one thread
with `torch.use_deterministic_algorithms(True)`, and Monte Carlo metrics use the engine's
counter-based masks with a fixed seed (the same code path that serves predictions).
"""

from __future__ import annotations

import copy
import math
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import sklearn
import torch
from torch import nn

from service.bundle.fingerprint import row_fingerprint
from service.engine.sampler import MCRequest, MCSampler

MODELS_DIR = Path(__file__).resolve().parent
DATA_DIR = MODELS_DIR / "data"
VERSION = "1"
MC_SAMPLES = 100  # passes for the held-out metrics
MC_SEED = 0  # mask seed for the held-out metrics
ECE_BINS = 15
INTENDED_USE_SUFFIX = (
    "Bundled with mcserve to exercise the service end to end: demonstration, not for clinical use."
)

Metrics = dict[str, float]


def configure_determinism(seed: int) -> None:
    """One thread, deterministic kernels, seeded global generator (call before building a model)."""
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class Split:
    """Row indices of the train (60 %), calibration (20 %) and test (20 %) parts."""

    train: np.ndarray
    calibration: np.ndarray
    test: np.ndarray

    def sizes(self) -> dict[str, int]:
        return {
            "train": int(self.train.size),
            "calibration": int(self.calibration.size),
            "test": int(self.test.size),
        }


def split_rows(n: int, seed: int, fractions: tuple[float, float] = (0.6, 0.2)) -> Split:
    """A seeded random permutation cut into train / calibration / test (the rest)."""
    perm = np.random.default_rng(seed).permutation(n)
    n_train = round(fractions[0] * n)
    n_cal = round(fractions[1] * n)
    return Split(
        train=np.sort(perm[:n_train]),
        calibration=np.sort(perm[n_train : n_train + n_cal]),
        test=np.sort(perm[n_train + n_cal :]),
    )


def fingerprints(x: np.ndarray, split: Split) -> dict[str, list[str]]:
    return {
        "train": row_fingerprint(x[split.train]),
        "calibration": row_fingerprint(x[split.calibration]),
        "test": row_fingerprint(x[split.test]),
    }


def _fmt(v: float) -> str:
    # repr is the shortest string that reads back as the same float64: "17.99", not 17.98999...
    return repr(float(v))


def write_csv(path: Path, x: np.ndarray, y: np.ndarray, feature_names: Sequence[str]) -> None:
    """Header = feature names then `target`; features as float64 reprs, integer targets as ints."""
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    if flat.shape[1] != len(feature_names):
        raise ValueError(f"{len(feature_names)} names for {flat.shape[1]} columns")
    integer = np.issubdtype(np.asarray(y).dtype, np.integer)
    lines = [",".join([*feature_names, "target"])]
    for row, t in zip(flat, y, strict=True):
        target = str(int(t)) if integer else _fmt(t)
        lines.append(",".join([*(_fmt(v) for v in row), target]))
    path.write_text("\n".join(lines) + "\n")


def read_csv(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(feature names, features [N, F] float64, target [N] float64) of a file from write_csv."""
    with path.open() as f:
        header = f.readline().strip().split(",")
    if header[-1] != "target":
        raise ValueError(f"{path}: the last column must be 'target', got {header[-1]!r}")
    data = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64, ndmin=2)
    return header[:-1], data[:, :-1], data[:, -1]


def fit(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int,
    on_epoch: Callable[[int], None] | None = None,
) -> nn.Module:
    """Minibatch Adam with a seeded shuffle; `on_epoch(epoch)` runs after each epoch (1-based)."""
    xt = torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32))
    yt = torch.as_tensor(y)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    n = xt.shape[0]
    for epoch in range(1, epochs + 1):
        model.train()
        perm = torch.randperm(n, generator=gen)
        for lo in range(0, n, batch_size):
            idx = perm[lo : lo + batch_size]
            if idx.numel() < 2:  # BatchNorm needs two rows; the last tiny batch is skipped
                continue
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
        if on_epoch is not None:
            on_epoch(epoch)
    return model.eval()


def mc_samples(
    module: nn.Module, x: np.ndarray, samples: int = MC_SAMPLES, seed: int = MC_SEED
) -> np.ndarray:
    """MC dropout outputs [T, B, outputs] through the engine's sampler (a copy of `module`)."""
    xs = np.ascontiguousarray(x, dtype=np.float32)
    sampler = MCSampler(copy.deepcopy(module), torch.as_tensor(xs[:2]), device="cpu")
    return sampler.run([MCRequest(xs, samples, seed)])[0]


def deterministic(module: nn.Module, x: np.ndarray) -> np.ndarray:
    """Dropout off (weight scaling): outputs [B, outputs]."""
    m = copy.deepcopy(module).eval()
    with torch.inference_mode():
        return m(torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32))).numpy()


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def classification_metrics(logits: np.ndarray, y: np.ndarray) -> Metrics:
    """Accuracy, NLL, Brier and ECE of the MC predictive p = mean_t softmax(logits_t).

    `logits` [T, B, K], `y` [B] class indices. Brier is the multi-class score
    mean_i sum_k (p_ik - [y_i = k])^2 (for two classes, twice the one-probability Brier).
    ECE: 15 equal-width bins of the top-class probability, sum_b n_b / n |acc_b - conf_b|.
    """
    p = softmax(logits).mean(axis=0)
    yi = np.asarray(y).astype(np.int64)
    n, k = p.shape
    onehot = np.eye(k)[yi]
    pred = p.argmax(axis=1)
    conf = p.max(axis=1)
    correct = (pred == yi).astype(np.float64)
    edges = np.linspace(0.0, 1.0, ECE_BINS + 1)
    bins = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, ECE_BINS - 1)
    ece = 0.0
    for b in range(ECE_BINS):
        m = bins == b
        if m.any():
            ece += m.sum() / n * abs(correct[m].mean() - conf[m].mean())
    return {
        "accuracy": float(correct.mean()),
        "nll": float(-np.log(np.clip(p[np.arange(n), yi], 1e-12, None)).mean()),
        "brier": float(((p - onehot) ** 2).sum(axis=1).mean()),
        "ece": float(ece),
    }


Z95 = NormalDist().inv_cdf(0.975)


def regression_metrics(samples: np.ndarray, y: np.ndarray, noise_var: float) -> Metrics:
    """RMSE of the MC mean, mean log-likelihood of the MC mixture, 95 % gaussian PICP and width.

    `samples` [T, B, 1] in target units; the predictive density of a row is the mixture
    (1/T) sum_t N(y; f_t, noise_var). The 95 % interval is the engine's gaussian one,
    mean +- z sqrt(var_t(f) + noise_var).
    """
    f = samples.astype(np.float64)[..., 0]
    t = f.shape[0]
    yy = np.asarray(y, dtype=np.float64)
    mean = f.mean(axis=0)
    log_comp = -0.5 * math.log(2 * math.pi * noise_var) - (yy - f) ** 2 / (2 * noise_var)
    top = log_comp.max(axis=0)
    ll = top + np.log(np.exp(log_comp - top).sum(axis=0)) - math.log(t)
    std = np.sqrt(f.var(axis=0) + noise_var)
    lo, hi = mean - Z95 * std, mean + Z95 * std
    return {
        "rmse": float(np.sqrt(((mean - yy) ** 2).mean())),
        "test_ll": float(ll.mean()),
        "picp_95": float(((yy >= lo) & (yy <= hi)).mean()),
        "mpiw_95": float((hi - lo).mean()),
    }


def mc_standard_errors(
    samples: np.ndarray,
    metric_fn: Callable[[np.ndarray], Metrics],
    *,
    reps: int = 200,
    seed: int = 0,
) -> Metrics:
    """Monte Carlo error of each metric: its std over bootstrap resamples of the T passes.

    This is the spread a different mask seed would give with the same T (the test rows fixed),
    so it bounds how far a recomputation with other random draws may legitimately land.
    """
    rng = np.random.default_rng(seed)
    t = samples.shape[0]
    draws = [metric_fn(samples[rng.integers(0, t, t)]) for _ in range(reps)]
    return {k: float(np.std([d[k] for d in draws], ddof=1)) for k in draws[0]}


def provenance(
    *, dataset: str, seed: int, split: Split, hyperparameters: dict[str, Any]
) -> dict[str, Any]:
    """What built the bundle (no timestamps or host names: rebuilds must be bit-identical)."""
    return {
        "dataset": dataset,
        "sklearn_version": sklearn.__version__,
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
        "seed": seed,
        "split": {
            "method": "numpy default_rng(seed).permutation, cut 60/20/20 (train/calibration/test)",
            **split.sizes(),
        },
        "hyperparameters": hyperparameters,
        "metrics_protocol": {
            "rows": "test",
            "samples": MC_SAMPLES,
            "mask_seed": MC_SEED,
            "sampler": "service.engine.sampler.MCSampler (counter-based masks), CPU",
        },
        "build_command": ".venv/bin/python -m models.build",
    }


def rounded(metrics: Metrics, digits: int = 6) -> Metrics:
    return {k: round(v, digits) for k, v in metrics.items()}
