"""`breast-cancer`: binary classifier on the Wisconsin Diagnostic Breast Cancer data (sklearn)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_breast_cancer
from torch import nn

from models import common
from service.bundle.manifest import Defaults, Training
from service.nn import Affine
from service.packaging import save

NAME = "breast-cancer"
SEED = 20240601
HIDDEN = 64
DROPOUT = 0.25  # a multiple of 1/256: the engine's quantised keep rule matches training exactly
EPOCHS = 60
BATCH = 32
LR = 1e-3
WEIGHT_DECAY = 1e-4
INTENDED_USE = (
    "Binary classification (malignant vs benign) of a breast mass from 30 nuclear features of a "
    "fine-needle-aspirate image, trained on the 569-case Wisconsin Diagnostic Breast Cancer data "
    "shipped with scikit-learn. " + common.INTENDED_USE_SUFFIX
)


def _unit(name: str) -> str:
    """A feature's unit from the dataset description (lengths: undocumented image units)."""
    if "radius" in name or "perimeter" in name:
        return "a.u."  # digitised-image length unit, not documented (probably pixels)
    if "area" in name:
        return "a.u.^2"
    if "texture" in name:
        return "grey level"  # standard deviation of grey-scale values
    return "dimensionless"  # smoothness, compactness, concavity, concave points, symmetry, FD


def model(mean: np.ndarray, std: np.ndarray) -> nn.Sequential:
    return nn.Sequential(
        Affine.of(torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std)),
        nn.Linear(30, HIDDEN),
        nn.ReLU(),
        nn.Dropout(DROPOUT),
        nn.Linear(HIDDEN, HIDDEN),
        nn.ReLU(),
        nn.Dropout(DROPOUT),
        nn.Linear(HIDDEN, 2),
    )


def build(out_dir: Path, data_dir: Path) -> Path:
    """Train, write the calibration/test CSVs, and save the bundle under `out_dir`."""
    data = load_breast_cancer()
    labels = [str(t) for t in data.target_names]
    if labels != ["malignant", "benign"]:
        raise RuntimeError(f"unexpected sklearn label order {labels}")
    names = [str(n) for n in data.feature_names]
    x = np.asarray(data.data, dtype=np.float64)
    y = np.asarray(data.target, dtype=np.int64)
    split = common.split_rows(len(x), SEED)
    xtr, ytr = x[split.train], y[split.train]

    common.configure_determinism(SEED)
    mean = xtr.mean(axis=0).astype(np.float32)
    std = xtr.std(axis=0).astype(np.float32)
    net = model(mean, std)
    common.fit(
        net,
        xtr,
        ytr,
        nn.functional.cross_entropy,
        epochs=EPOCHS,
        batch_size=BATCH,
        lr=LR,
        weight_decay=WEIGHT_DECAY,
        seed=SEED,
    )

    xte, yte = x[split.test], y[split.test]
    metrics = common.classification_metrics(common.mc_samples(net, xte), yte)
    det = common.classification_metrics(common.deterministic(net, xte)[None], yte)
    common.write_csv(
        data_dir / f"{NAME}-calibration.csv", x[split.calibration], y[split.calibration], names
    )
    common.write_csv(data_dir / f"{NAME}-test.csv", xte, yte, names)

    maxima = x.max(axis=0)
    return save(
        net,
        torch.as_tensor(xtr[:4], dtype=torch.float32),
        out_dir=out_dir,
        name=NAME,
        version=common.VERSION,
        task="classification",
        intended_use=INTENDED_USE,
        labels=labels,
        feature_names=names,
        units=[_unit(n) for n in names],
        # Hard sanity ranges: no feature can be negative; 10x the largest value in the data.
        valid_ranges=[(0.0, float(10 * m)) for m in maxima],
        training_ranges=[(float(a), float(b)) for a, b in zip(xtr.min(0), xtr.max(0), strict=True)],
        defaults=Defaults(samples=100, confidence=0.95, interval="gaussian"),
        training=Training(
            provenance=common.provenance(
                dataset="sklearn.datasets.load_breast_cancer (WDBC, 569 rows, 30 features)",
                seed=SEED,
                split=split,
                hyperparameters={
                    "architecture": "Affine(standardise) 30-64-64-2 MLP, ReLU, dropout after "
                    "each hidden layer",
                    "dropout": DROPOUT,
                    "epochs": EPOCHS,
                    "batch_size": BATCH,
                    "optimizer": "Adam",
                    "lr": LR,
                    "weight_decay": WEIGHT_DECAY,
                    "loss": "cross-entropy",
                },
            )
            | {"label_encoding": "target 0 = malignant, 1 = benign (sklearn target_names)"},
            metrics=common.rounded(metrics)
            | {f"deterministic_{k}": v for k, v in common.rounded(det).items()},
            row_fingerprints=common.fingerprints(x, split),
        ),
    )
