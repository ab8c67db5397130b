"""Tiny bundles (a classifier and a regressor) with labelled CSVs for the calibration tests.

A module of its own (not conftest): test directories share the module name `conftest`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from nets import mlp

from service.packaging import save

CLF_FEATURES = ["f0", "f1", "f2", "f3"]
REG_FEATURES = ["x0", "x1", "x2"]
CAL_SAMPLES = 50  # passes used by calibrate in these fixtures


@dataclass(frozen=True)
class Repo:
    root: Path
    data: Path  # directory of the CSVs: <name>-calibration.csv, <name>-test.csv


def write_csv(path: Path, names: list[str], x: np.ndarray, y: np.ndarray) -> None:
    lines = [",".join([*names, "target"])]
    for row, t in zip(x, y, strict=True):
        lines.append(",".join([*(repr(float(v)) for v in row), repr(t.item())]))
    path.write_text("\n".join(lines) + "\n")


def build(root: Path) -> Repo:
    torch.manual_seed(0)
    save(
        mlp(0.25, d_in=4, hidden=16, d_out=3),
        torch.randn(4, 4),
        out_dir=root,
        name="clf",
        version="1",
        task="classification",
        intended_use="tests only",
        labels=["red", "green", "blue"],
        feature_names=CLF_FEATURES,
        valid_ranges=[(-10.0, 10.0)] * 4,
        training_ranges=[(-3.0, 3.0)] * 4,
    )
    save(
        mlp(0.25, d_in=3, hidden=16, d_out=1),
        torch.randn(4, 3),
        out_dir=root,
        name="reg",
        version="1",
        task="regression",
        intended_use="tests only",
        target="y",
        feature_names=REG_FEATURES,
        training_ranges=[(-2.0, 2.0)] * 3,
        noise_var=0.25,
    )
    data = root.parent / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for part, n in (("calibration", 60), ("test", 40)):
        xc = rng.normal(size=(n, 4)).round(3)
        write_csv(data / f"clf-{part}.csv", CLF_FEATURES, xc, rng.integers(0, 3, n))
        xr = rng.normal(size=(n, 3)).clip(-1.9, 1.9).round(3)
        yr = (xr.sum(axis=1) * 0.1 + rng.normal(scale=0.5, size=n)).round(3)
        write_csv(data / f"reg-{part}.csv", REG_FEATURES, xr, yr)
    return Repo(root, data)
