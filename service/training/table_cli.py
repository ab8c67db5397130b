"""The tabular branch of `python -m service train`: a CSV of numbers -> MLP, bundle, calibration.

The served module bakes both standardisations into the graph (`served.py`). The bundle's hard
`valid_ranges` are deliberately generous: [min - 10 w, max + 10 w] over the training rows,
w = max - min (w = max(|value|, 1) for a constant column). They catch garbage (a wrong unit, a
typo), not extrapolation; that is what `training_ranges` ([min, max] over the training rows)
and the referral policy's `extrapolation` flag are for.
"""

from __future__ import annotations

import csv
import platform
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import typer
from torch import nn

from service.bundle.fingerprint import row_fingerprint
from service.bundle.manifest import Defaults, Training
from service.bundle.spec import InputSpec
from service.engine.inputs import to_array
from service.errors import InvalidInputError
from service.packaging import save
from service.training.classes import check_trained
from service.training.mlp import Noise, train_mlp
from service.training.results import TrainResult
from service.training.served import (
    METRIC_PASSES,
    check_served,
    fixed_noise_var,
    held_out_metrics,
    served_module,
)
from service.training.table import Table, read_table, split
from service.training.versions import METHOD_FLAG, check_free, write_calibrated

VALID_RANGE_WIDTHS = 10.0  # hard valid range: this many training-range widths either side


def train_table(
    *,
    data: Path,
    target: str,
    task: Literal["regression", "classification"],
    out: Path,
    name: str,
    version: str,
    seed: int,
    epochs: int,
    progress: bool,
    labels_given: list[str] | None,
    hidden: list[int],
    noise: Noise,
    calibration_method: str,
    ignore: list[str] | None = None,
) -> Path:
    """Train, save version `version`, calibrate into the next; returns the calibrated path."""
    from service.calibration.selection import check_rows

    table = read_table(data, target, task, labels_given, ignore)
    tr, cal = split(len(table.x), seed)
    if task == "classification":
        assert table.labels is not None
        # Stated, since /v1's probabilities and OIP's `label` index follow this order.
        said = "as --labels gives" if labels_given is not None else "set it with --labels"
        typer.echo(f"classes in output order: {table.labels} ({said})", err=True)
    for note in table.notes:
        typer.echo(f"note: {note}", err=True)
    if task == "classification":
        assert table.labels is not None
        check_trained(
            table.labels, table.y, tr, data, "the seeded 80/20 cut put them among the "
            "calibration rows", "add rows of these classes, or try another --seed",
        )  # fmt: skip
        # What the calibration method needs of the calibration rows, asked before training.
        check_rows(
            calibration_method, table.y[cal], len(table.labels), flag=METHOD_FLAG,
            labels=table.labels,
        )  # fmt: skip
    check_free(out, name, version)
    xtr, ytr = table.x[tr], table.y[tr]
    # The ranges come from the training rows alone; a calibration row outside the valid ones
    # is refused as calibrate would refuse it, but now, not after the training.
    training_ranges, valid_ranges = _ranges(xtr)
    _check_calibration_rows(table, cal, valid_ranges)
    if progress:
        typer.echo(f"training on {len(tr)} rows ({len(cal)} kept for calibration)", err=True)
    res = train_mlp(
        xtr, ytr, seed=seed, hidden=hidden, task=task, epochs=epochs, progress=progress,
        noise=noise,
    )  # fmt: skip
    for note in res.notes:
        typer.echo(f"note: {note}", err=True)
    fm = res.final
    module = served_module(fm)
    check_served(module, fm, table.x)
    noise_var = fixed_noise_var(fm)

    def write(repo: Path) -> Path:
        bundle = save(
            module,
            torch.as_tensor(xtr[:4], dtype=torch.float32),
            out_dir=repo,
            name=name,
            version=version,
            task=task,
            intended_use=f"trained from {data.name} by `python -m service train`; "
            "not validated for clinical use",
            labels=table.labels,
            target=target,
            feature_names=table.feature_names,
            valid_ranges=valid_ranges,
            training_ranges=training_ranges,
            noise_var=noise_var,
            variance="log_variance" if fm.learned_noise else None,
            defaults=Defaults(samples=METRIC_PASSES, confidence=0.95, interval="gaussian"),
            training=Training(
                provenance=_provenance(table, target, res, seed, len(tr), len(cal)),
                metrics=held_out_metrics(fm, table.x[cal], table.y[cal], seed),
                row_fingerprints={
                    "train": row_fingerprint(xtr),
                    "calibration": row_fingerprint(table.x[cal]),
                },
            ),
        )
        if progress:
            typer.echo(f"saved version {version}; calibrating on {len(cal)} rows", err=True)
        return bundle

    result = write_calibrated(
        out, name, version, write, partial(_write_calibration_csv, table=table, rows=cal), seed,
        calibration_method,
    )  # fmt: skip
    for w in result.warnings:
        typer.echo(f"warning: {w}", err=True)
    return Path(result.path)


def _ranges(x: np.ndarray) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    lo, hi = x.min(axis=0), x.max(axis=0)
    width = np.where(hi > lo, hi - lo, np.maximum(np.abs(lo), 1.0))
    training = [(float(a), float(b)) for a, b in zip(lo, hi, strict=True)]
    valid = [
        (float(a - VALID_RANGE_WIDTHS * w), float(b + VALID_RANGE_WIDTHS * w))
        for a, b, w in zip(lo, hi, width, strict=True)
    ]
    return training, valid


def _check_calibration_rows(
    table: Table, cal: np.ndarray, valid_ranges: list[tuple[float, float]]
) -> None:
    """Refuse, naming its row of the user's CSV, a calibration row that the served model (and so
    the calibrate step) would refuse: a value outside the hard valid ranges."""
    if not len(cal):
        return
    spec = InputSpec(
        shape=[len(table.feature_names)], feature_names=table.feature_names,
        valid_ranges=valid_ranges,
    )  # fmt: skip
    try:
        to_array(table.x[cal].tolist(), spec, max_instances=len(cal))
    except InvalidInputError as exc:
        raise InvalidInputError(
            f"{table.path}: {table.file.instances_as_rows(exc.message, cal.tolist())} (a "
            f"calibration row: the valid ranges reach {VALID_RANGE_WIDTHS:g} widths of the "
            "training rows' range beyond it, so the value is far from every training value); "
            "fix or drop the row"
        ) from None


def _write_calibration_csv(dest: Path, *, table: Table, rows: np.ndarray) -> None:
    with dest.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*table.feature_names, "target"])
        for i in rows:
            t = table.labels[int(table.y[i])] if table.labels else repr(float(table.y[i]))
            w.writerow([*(repr(float(v)) for v in table.x[i]), t])


def _provenance(
    table: Table, target: str, res: TrainResult, seed: int, n_train: int, n_cal: int
) -> dict[str, Any]:
    fm = res.final
    linears = [m for m in fm.model if isinstance(m, nn.Linear)]
    return {
        "dataset": f"{table.path.name} (sha256 {table.sha256})",
        "target_column": target,
        "ignored_columns": table.ignored,  # calibrate and evaluate leave them out too
        "seed": seed,
        "split": {
            "method": "numpy default_rng(seed).permutation, cut 80/20 (train/calibration)",
            "train": n_train,
            "calibration": n_cal,
        },
        "hyperparameters": {
            "architecture": "Affine(standardise) "
            + "-".join(
                str(d) for d in [len(table.feature_names), *(int(m.out_features) for m in linears)]
            )
            + " MLP, dropout before each Linear, ReLU"
            + (", Affine(de-standardise target)" if fm.task == "regression" else ""),
            "trainer": "service.training.train_mlp (Gal & Ghahramani 2016 protocol)",
            "epochs": res.epochs,
            "dropout": fm.dropout_rate,
            "noise": "learned (log-variance head, Gaussian NLL)"
            if fm.learned_noise
            else "fixed: tau fitted on the validation rows (standardised target)",
            "tau": float(fm.tau[0]) if fm.tau is not None else None,
            "weight_decay": fm.weight_decay,
            "validation_rows": res.n_val,
        },
        "grid": [
            {"dropout": g.dropout_rate, "tau": g.tau, "val_ll": round(g.val_ll, 6)}
            for g in res.grid
        ],
        "notes": res.notes,
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
        "build_command": "python -m service train",
    }
