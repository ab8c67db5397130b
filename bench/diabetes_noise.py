"""Diabetes with a learned noise (issue 22, item 5): does referral now pick the worse predictions?

The bundled `diabetes` (version 2) has one fixed noise std (49.5) that dominates its predictive
std, so its referral by interval width refers low predictions, not uncertain ones
(docs/evaluation/README.md). This trains, on the bundled model's own train rows (same split,
models/common.split_rows with its seed), two MLPs with `service.training.train_mlp`: a fixed
noise fitted on validation (`noise="fit"`) and a learned log-variance head (`noise="learned"`);
bundles, calibrates (models/data/diabetes-calibration.csv) and evaluates
(models/data/diabetes-test.csv) both exactly as `service calibrate` / `evaluate` would, and
prints the numbers with the bundled version 2's evaluation beside them. Nothing is written to
models/: the bundles live in a temporary directory.

    python -m bench.diabetes_noise [--epochs 400] [--samples 1000] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_diabetes

from bench.common import machine, now
from models import common, diabetes
from service.bundle import load_bundle
from service.calibration.data import read
from service.calibration.evaluation import evaluate, finite_or_none
from service.calibration.recalibration import calibrate_bundle
from service.engine.model import ServedModel
from service.packaging import save
from service.training.mlp import train_mlp
from service.training.served import served_module

ROOT = Path(__file__).resolve().parents[1]
NAMES = [f[1] for f in diabetes.FEATURES]


def _summary(ev: dict[str, Any]) -> dict[str, Any]:
    ref = ev["referral"]
    iv = {m: {i["level"]: i["coverage"] for i in v} for m, v in ev["intervals"].items()}
    return {
        "rmse": ev["rmse"],
        "mean_log_likelihood": ev["mean_log_likelihood"],
        "mean_std": ev["mean_std"],
        "mean_aleatoric_std": ev.get("mean_aleatoric_std"),
        "coverage_95": {m: c.get(0.95) for m, c in iv.items()},
        "referral_rate": ref["rate"],
        "rmse_referred": ref["rmse_referred"],
        "rmse_not_referred": ref["rmse_not_referred"],
        "triggers": ref["triggers"],
    }


def run(epochs: int, samples: int) -> dict[str, Any]:
    data = load_diabetes(scaled=False)
    x, y = np.asarray(data.data, np.float64), np.asarray(data.target, np.float64)
    split = common.split_rows(len(x), diabetes.SEED)
    xtr, ytr = x[split.train], y[split.train]
    out: dict[str, Any] = {}
    bundled = json.loads((ROOT / "docs/evaluation/diabetes/report.json").read_text())
    out["bundled v2 (fixed noise 49.5, models/diabetes.py)"] = _summary(bundled)
    with tempfile.TemporaryDirectory(prefix="diabetes-noise-") as tmp:
        repo = Path(tmp)
        for noise in ("fit", "learned"):
            torch.manual_seed(0)
            res = train_mlp(
                xtr, ytr, seed=0, hidden=(64, 64), epochs=epochs, noise=noise, val_passes=1000
            )
            fm = res.final
            lo, hi = xtr.min(axis=0), xtr.max(axis=0)
            src = save(
                served_module(fm),
                torch.as_tensor(xtr[:4], dtype=torch.float32),
                out_dir=repo,
                name=f"diabetes-{noise}",
                version="1",
                task="regression",
                intended_use="experiment",
                target="progression",
                feature_names=NAMES,
                training_ranges=list(zip(lo.tolist(), hi.tolist(), strict=True)),
                noise_var=float(1.0 / fm.tau[0]) if fm.tau is not None else None,
                variance="log_variance" if fm.learned_noise else None,
            )
            cal = calibrate_bundle(
                src, ROOT / "models/data/diabetes-calibration.csv", repo, samples=samples
            )
            served = ServedModel(load_bundle(cal.path), device="cpu")
            test = read(ROOT / "models/data/diabetes-test.csv", served.manifest)
            ev = finite_or_none(evaluate(served, test, samples=samples, seed=0).numbers)
            label = f"train_mlp noise={noise} (dropout {fm.dropout_rate:g})"
            out[label] = _summary(ev) | {"notes": res.notes}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epochs", type=int, default=400)
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    result = {"machine": machine(), "date": now(), "epochs": args.epochs} | run(
        args.epochs, args.samples
    )
    text = json.dumps(result, indent=1)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
