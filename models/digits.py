"""`digits`: 8x8 handwritten digit classifier (sklearn's copy of the UCI optical digits data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

from models import common
from service.bundle.manifest import Defaults, Training
from service.nn import Affine
from service.packaging import save

NAME = "digits"
SEED = 20240603
DROPOUT = 0.3
EPOCHS = 30
BATCH = 64
LR = 1e-3
WEIGHT_DECAY = 1e-4
MAX_VALUE = 16.0  # pixel values are counts of set bits in 4x4 blocks: integers 0..16
INTENDED_USE = (
    "Classification of 8x8 greyscale images of handwritten digits (pixel values 0-16) into 0-9, "
    "trained on the 1797-image digits data shipped with scikit-learn. " + common.INTENDED_USE_SUFFIX
)


def model() -> nn.Sequential:
    """Pixels 0..16 in; Affine(8) divides by 16 along the last (width) axis of [B, 1, 8, 8]."""
    return nn.Sequential(
        Affine.of(torch.zeros(8), torch.full((8,), MAX_VALUE)),
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(512, 128),
        nn.ReLU(),
        nn.Dropout(DROPOUT),
        nn.Linear(128, 10),
    )


def build(out_dir: Path, data_dir: Path) -> Path:
    """Train, write the calibration/test CSVs, and save the bundle under `out_dir`."""
    data = load_digits()
    x = np.asarray(data.data, dtype=np.float64)  # [N, 64], row-major 8x8
    y = np.asarray(data.target, dtype=np.int64)
    images = x.reshape(-1, 1, 8, 8)
    names = [f"px{i}" for i in range(64)]
    labels = [str(int(t)) for t in data.target_names]
    split = common.split_rows(len(x), SEED)

    common.configure_determinism(SEED)
    net = model()
    common.fit(
        net,
        images[split.train],
        y[split.train],
        nn.functional.cross_entropy,
        epochs=EPOCHS,
        batch_size=BATCH,
        lr=LR,
        weight_decay=WEIGHT_DECAY,
        seed=SEED,
    )

    xte, yte = images[split.test], y[split.test]
    metrics = common.classification_metrics(common.mc_samples(net, xte), yte)
    det = common.classification_metrics(common.deterministic(net, xte)[None], yte)
    common.write_csv(
        data_dir / f"{NAME}-calibration.csv", x[split.calibration], y[split.calibration], names
    )
    common.write_csv(data_dir / f"{NAME}-test.csv", x[split.test], yte, names)

    return save(
        net,
        torch.as_tensor(images[split.train][:4], dtype=torch.float32),
        out_dir=out_dir,
        name=NAME,
        version=common.VERSION,
        task="classification",
        intended_use=INTENDED_USE,
        labels=labels,
        feature_names=names,
        value_range=(0.0, MAX_VALUE),
        defaults=Defaults(samples=100, confidence=0.95, interval="gaussian"),
        training=Training(
            provenance=common.provenance(
                dataset="sklearn.datasets.load_digits (1797 8x8 images, 10 classes)",
                seed=SEED,
                split=split,
                hyperparameters={
                    "architecture": "Affine(/16), Conv2d(1,16,3,p=1)+BN+ReLU, "
                    "Conv2d(16,32,3,p=1)+BN+ReLU, MaxPool2d(2), Flatten, Linear(512,128)+ReLU, "
                    "Dropout, Linear(128,10)",
                    "dropout": DROPOUT,
                    "epochs": EPOCHS,
                    "batch_size": BATCH,
                    "optimizer": "Adam",
                    "lr": LR,
                    "weight_decay": WEIGHT_DECAY,
                    "loss": "cross-entropy",
                },
            )
            | {"input_layout": "[1, 8, 8] row-major; CSV columns px0..px63 = row * 8 + column"},
            metrics=common.rounded(metrics)
            | {f"deterministic_{k}": v for k, v in common.rounded(det).items()},
            row_fingerprints=common.fingerprints(x, split),
        ),
    )
