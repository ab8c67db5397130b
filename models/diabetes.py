"""`diabetes`: regressor of disease progression on the Efron et al. (2004) diabetes data."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_diabetes
from torch import nn

from models import common
from service.bundle.manifest import Defaults, Training
from service.nn import Affine
from service.packaging import save

NAME = "diabetes"
SEED = 20240602
HIDDEN = 64
DROPOUT = 0.25  # a multiple of 1/256: the engine's quantised keep rule matches training exactly
MAX_EPOCHS = 150
BATCH = 32
LR = 1e-3
WEIGHT_DECAY = 1e-4
VALIDATION_FRACTION = 0.2  # of the train split, to choose the epochs and the noise precision
# Noise variance grid as a fraction of the training target variance (tau = 1 / noise_var).
NOISE_FRACTIONS = np.round(np.geomspace(0.05, 1.0, 25), 6)

# sklearn column -> descriptive name, unit, hard valid range (physically plausible, generous).
FEATURES: list[tuple[str, str, str, tuple[float, float]]] = [
    ("age", "age", "years", (0.0, 120.0)),
    ("sex", "sex", "code", (1.0, 2.0)),  # 1 or 2; which code is which sex is undocumented
    ("bmi", "bmi", "kg/m^2", (10.0, 80.0)),
    ("bp", "bp", "mmHg", (30.0, 250.0)),  # average (mean arterial) blood pressure
    ("s1", "tc", "mg/dL", (50.0, 1000.0)),  # total serum cholesterol
    ("s2", "ldl", "mg/dL", (0.0, 900.0)),  # low-density lipoproteins
    ("s3", "hdl", "mg/dL", (5.0, 250.0)),  # high-density lipoproteins
    ("s4", "tch", "ratio", (0.5, 50.0)),  # total cholesterol / HDL (mostly rounded to integers)
    ("s5", "ltg", "ln(mg/dL)", (1.5, 10.0)),  # natural log of serum triglycerides (inferred)
    ("s6", "glu", "mg/dL", (20.0, 1000.0)),  # blood sugar level
]
TARGET = "disease progression one year after baseline"
INTENDED_USE = (
    "Regression of a quantitative measure of diabetes disease progression one year after "
    "baseline from 10 baseline variables, trained on the 442-patient diabetes data of Efron et "
    "al. (2004) shipped with scikit-learn. " + common.INTENDED_USE_SUFFIX
)


def model(mean: np.ndarray, std: np.ndarray, y_mean: float, y_std: float) -> nn.Sequential:
    """Raw clinical units in, progression score out: both standardisations are in the graph."""
    return nn.Sequential(
        Affine.of(torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std)),
        nn.Linear(10, HIDDEN),
        nn.ReLU(),
        nn.Dropout(DROPOUT),
        nn.Linear(HIDDEN, HIDDEN),
        nn.ReLU(),
        nn.Dropout(DROPOUT),
        nn.Linear(HIDDEN, 1),
        Affine.of(torch.tensor([-y_mean / y_std]), torch.tensor([1.0 / y_std])),
    )


def _fit(
    x: np.ndarray, y: np.ndarray, epochs: int, on_epoch: Callable[[nn.Module, int], None] | None
) -> nn.Sequential:
    """A fresh seeded model trained on (x, y); `on_epoch(model, epoch)` after each epoch."""
    common.configure_determinism(SEED)
    y_mean, y_std = float(y.mean()), float(y.std())
    net = model(x.mean(axis=0).astype(np.float32), x.std(axis=0).astype(np.float32), y_mean, y_std)

    def loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # MSE in standardised units, so the learning rate does not depend on the target's scale.
        return nn.functional.mse_loss(out[:, 0] / y_std, target / y_std)

    common.fit(
        net,
        x,
        y.astype(np.float32),
        loss,
        epochs=epochs,
        batch_size=BATCH,
        lr=LR,
        weight_decay=WEIGHT_DECAY,
        seed=SEED,
        on_epoch=None if on_epoch is None else lambda epoch: on_epoch(net, epoch),
    )
    return net


def _validate(x: np.ndarray, y: np.ndarray) -> tuple[int, float, dict[str, Any]]:
    """Epochs (best deterministic validation RMSE) and noise variance (best validation MC LL).

    Part of the train split is held out; the calibration and test rows are never looked at.
    """
    inner_n = round((1 - VALIDATION_FRACTION) * len(x))
    perm = np.random.default_rng(SEED + 1).permutation(len(x))
    tr, va = np.sort(perm[:inner_n]), np.sort(perm[inner_n:])
    best: dict[str, Any] = {"rmse": np.inf, "epoch": 0, "state": None}

    def on_epoch(net: nn.Module, epoch: int) -> None:
        rmse = float(np.sqrt(((common.deterministic(net, x[va])[:, 0] - y[va]) ** 2).mean()))
        if rmse < best["rmse"]:
            best.update(rmse=rmse, epoch=epoch, state=copy.deepcopy(net.state_dict()))

    net = _fit(x[tr], y[tr], MAX_EPOCHS, on_epoch)
    net.load_state_dict(best["state"])
    samples = common.mc_samples(net, x[va])
    var_y = float(y[tr].var())
    scores = {
        float(r): common.regression_metrics(samples, y[va], r * var_y)["test_ll"]
        for r in NOISE_FRACTIONS
    }
    frac = max(scores, key=lambda r: scores[r])
    if frac in (NOISE_FRACTIONS[0], NOISE_FRACTIONS[-1]):
        raise RuntimeError(f"noise variance {frac} x var(y) is at the edge of the grid")
    report = {
        "validation_rows": int(va.size),
        "epochs_chosen": int(best["epoch"]),
        "validation_rmse": round(float(best["rmse"]), 6),
        "noise_fraction_chosen": frac,
        "validation_ll": round(scores[frac], 6),
    }
    return int(best["epoch"]), frac * var_y, report


def build(out_dir: Path, data_dir: Path) -> Path:
    """Choose epochs and tau on validation, retrain on the train split, evaluate, save."""
    data = load_diabetes(scaled=False)
    cols = [str(c) for c in data.feature_names]
    if cols != [f[0] for f in FEATURES]:
        raise RuntimeError(f"unexpected sklearn columns {cols}")
    names = [f[1] for f in FEATURES]
    x = np.asarray(data.data, dtype=np.float64)
    y = np.asarray(data.target, dtype=np.float64)
    split = common.split_rows(len(x), SEED)
    xtr, ytr = x[split.train], y[split.train]

    epochs, noise_var, selection = _validate(xtr, ytr)
    net = _fit(xtr, ytr, epochs, None)
    noise_var = float(np.float32(noise_var))

    xte, yte = x[split.test], y[split.test]
    metrics = common.regression_metrics(common.mc_samples(net, xte), yte, noise_var)
    det_rmse = float(np.sqrt(((common.deterministic(net, xte)[:, 0] - yte) ** 2).mean()))
    common.write_csv(
        data_dir / f"{NAME}-calibration.csv", x[split.calibration], y[split.calibration], names
    )
    common.write_csv(data_dir / f"{NAME}-test.csv", xte, yte, names)

    return save(
        net,
        torch.as_tensor(xtr[:4], dtype=torch.float32),
        out_dir=out_dir,
        name=NAME,
        version=common.VERSION,
        task="regression",
        intended_use=INTENDED_USE,
        target=TARGET,
        target_unit="score (unitless)",
        feature_names=names,
        units=[f[2] for f in FEATURES],
        valid_ranges=[f[3] for f in FEATURES],
        training_ranges=[(float(a), float(b)) for a, b in zip(xtr.min(0), xtr.max(0), strict=True)],
        noise_var=noise_var,
        defaults=Defaults(samples=100, confidence=0.95, interval="gaussian"),
        training=Training(
            provenance=common.provenance(
                dataset="sklearn.datasets.load_diabetes(scaled=False) (442 rows, 10 features)",
                seed=SEED,
                split=split,
                hyperparameters={
                    "architecture": "Affine(standardise) 10-64-64-1 MLP, ReLU, dropout after "
                    "each hidden layer, Affine(de-standardise target)",
                    "dropout": DROPOUT,
                    "max_epochs": MAX_EPOCHS,
                    "epochs": epochs,
                    "batch_size": BATCH,
                    "optimizer": "Adam",
                    "lr": LR,
                    "weight_decay": WEIGHT_DECAY,
                    "loss": "MSE on the standardised target",
                    "noise_var": noise_var,
                    "tau": 1.0 / noise_var,
                    "noise_grid": "noise_var = r * var(y_train), r in geomspace(0.05, 1, 25)",
                },
            )
            | {
                "selection": selection,
                "feature_map": {f[1]: f"sklearn {f[0]}" for f in FEATURES},
            },
            metrics=common.rounded(metrics) | {"deterministic_rmse": round(det_rmse, 6)},
            row_fingerprints=common.fingerprints(x, split),
        ),
    )
