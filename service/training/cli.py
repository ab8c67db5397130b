"""`python -m service train`: an MC-dropout MLP from a CSV file, bundled and calibrated.

The rows are shuffled with `--seed` and cut 80/20 into training and calibration rows. The
trainer (`train_mlp`, the protocol of Gal & Ghahramani) holds out the last 20 % of the training
rows to choose (dropout rate, tau) on validation log-likelihood and refits the chosen
configuration on all training rows. The served module bakes both standardisations into the
graph, `Affine(x_mean, x_std)`, the fitted layers, and for a regressor `Affine` back to the
target's units, so clients send raw feature values and get answers in the target's units.

The bundle's hard `valid_ranges` are deliberately generous: [min - 10 w, max + 10 w] over the
training rows, w = max - min (w = max(|value|, 1) for a constant column). They catch garbage
(a wrong unit, a typo), not extrapolation; that is what `training_ranges` ([min, max] over the
training rows) and the referral policy's `extrapolation` flag are for.

A classifier's classes are ordered as `--labels` lists them, else numeric labels by value and
other labels sorted as text (scikit-learn's order); the order is printed, since /v1's
probabilities and OIP's `label` index follow it. The bundle (version
`--version`) is then calibrated exactly as `python -m service calibrate` would be, on the
calibration rows, into the next version, whose path is printed. What can be checked is checked
before training (the CSV, the name and version, what the calibration method needs of the
calibration rows); if the calibration still fails, the version just written is removed again
(versions.py).
"""

from __future__ import annotations

import csv
import platform
import re
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal, cast

import numpy as np
import torch
import typer
from torch import nn

from service.bundle.fingerprint import row_fingerprint
from service.bundle.manifest import Defaults, Training
from service.errors import InvalidInputError, McServeError
from service.packaging import save
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
from service.training.versions import METHOD_FLAG, calibrate_written, check_free, check_names

VALID_RANGE_WIDTHS = 10.0  # hard valid range: this many training-range widths either side


def _ranges(x: np.ndarray) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    lo, hi = x.min(axis=0), x.max(axis=0)
    width = np.where(hi > lo, hi - lo, np.maximum(np.abs(lo), 1.0))
    training = [(float(a), float(b)) for a, b in zip(lo, hi, strict=True)]
    valid = [
        (float(a - VALID_RANGE_WIDTHS * w), float(b + VALID_RANGE_WIDTHS * w))
        for a, b, w in zip(lo, hi, width, strict=True)
    ]
    return training, valid


def default_name(path: Path) -> str:
    name = re.sub(r"[^a-z0-9._-]+", "-", path.stem.lower()).lstrip("._-")[:64].rstrip("._-")
    return name or "model"


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


def train(
    data: Annotated[Path, typer.Option(help="CSV with a header: numeric features + target")],
    target: Annotated[str, typer.Option(help="the target column")],
    task: Annotated[str, typer.Option(help="regression or classification")],
    out: Annotated[Path, typer.Option(help="model repository: writes OUT/<name>/<version>/")],
    hidden: Annotated[str, typer.Option(help="hidden layer sizes, comma separated")] = "64,64",
    name: Annotated[str | None, typer.Option(help="bundle name (default: the CSV's stem)")] = None,
    version: Annotated[str, typer.Option(help="version of the uncalibrated bundle")] = "1",
    seed: Annotated[int, typer.Option(help="split, training and mask seed")] = 0,
    epochs: Annotated[int, typer.Option(help="training epochs per configuration")] = 400,
    progress: Annotated[bool, typer.Option(help="show training progress")] = False,
    labels: Annotated[
        str | None,
        typer.Option(
            help="classification: the classes in output order, comma separated, e.g. "
            "low,medium,high (default: numeric labels by value, others sorted as text)"
        ),
    ] = None,
    noise: Annotated[
        str, typer.Option(help="regression: fixed (one fitted level) or learned (per input)")
    ] = "fixed",
    # Text data (issue 21): docs/TRAINING_TEXT.md; `service.training.text_cli` does the work.
    text_column: Annotated[
        str | None,
        typer.Option(help="text: the column of texts (default: detected when one column is text)"),
    ] = None,
    arch: Annotated[
        str, typer.Option(help="text: textcnn, bilstm, transformer or fasttext")
    ] = "textcnn",
    splits: Annotated[
        Path | None,
        typer.Option(help="text: CSV row,split (train/calibration/test) instead of the 80/20 cut"),
    ] = None,
    max_tokens: Annotated[int, typer.Option(help="text: tokens per text (longer: cut)")] = 256,
    word_vectors: Annotated[
        Path | None,
        typer.Option(
            help="text: pretrained word vectors (GloVe text format) to start the embedding "
            "(textcnn, bilstm, fasttext)"
        ),
    ] = None,
    word_min_texts: Annotated[
        int,
        typer.Option(
            help="text: the bundle lists the words of at least this many distinct training "
            "texts, for the unfamiliar-text referral (0: no word list)"
        ),
    ] = 2,
    calibration_method: Annotated[
        str,
        typer.Option(
            help="classification: temperature, vector (per-class scale and bias) or auto, as "
            "`calibrate --method`"
        ),
    ] = "temperature",
) -> None:
    """Train an MC-dropout MLP on a CSV, bundle it and calibrate it (prints the bundle path)."""
    from service.calibration.selection import METHODS, check_rows

    def fail(msg: str) -> typer.Exit:
        typer.echo(f"error: {msg}", err=True)
        return typer.Exit(2)

    try:
        sizes = [int(h) for h in hidden.split(",") if h.strip()]
    except ValueError:
        raise fail(f"--hidden {hidden!r}: give comma-separated integers, e.g. 64,64") from None
    if not sizes or min(sizes) < 1:
        raise fail(f"--hidden {hidden!r}: give positive layer sizes, e.g. 64,64")
    if task not in ("regression", "classification"):
        raise fail(f"--task {task!r}: use regression or classification")
    if epochs < 1:
        raise fail("--epochs must be >= 1")
    if labels is not None and task != "classification":
        raise fail("--labels is for --task classification; a regressor has no classes")
    given = [v.strip() for v in labels.split(",")] if labels is not None else None
    if given is not None and (len(given) < 2 or "" in given):
        raise fail(f"--labels {labels!r}: give two or more class labels, comma separated")
    if calibration_method not in METHODS or (
        calibration_method != "temperature" and task != "classification"
    ):
        raise fail(
            f"--calibration-method {calibration_method!r}: use {', '.join(METHODS)} "
            "(vector and auto are for --task classification)"
        )
    if noise not in ("fixed", "learned") or (noise == "learned" and task != "regression"):
        raise fail(f"--noise {noise!r}: use fixed or learned (learned is for regression only)")
    # A fixed noise is fitted in the target's own scale, never read off a grid in its units.
    how: Noise = "learned" if noise == "learned" else "fit" if task == "regression" else "grid"
    kind = cast(Literal["regression", "classification"], task)
    bundle_name = name if name is not None else default_name(data)
    try:
        # Before any training: a bad name or version is refused now, not when the bundle is
        # written (versions.py).
        check_names(bundle_name, version)
        from service.training.text_data import detect_text_column

        text_col = text_column or detect_text_column(data, target)
        if text_col is not None or splits is not None:
            from service.training.text_cli import train_text

            if task != "classification" or text_col is None:
                raise InvalidInputError(
                    "text training is --task classification with a text column (--splits is "
                    "for text data only so far)"
                )
            path = train_text(
                data=data, target=target, text_column=text_col, out=out, name=bundle_name,
                version=version, seed=seed, max_epochs=epochs, progress=progress,
                labels_given=given, arch=arch, splits=splits, max_tokens=max_tokens,
                calibration_method=calibration_method, word_min_texts=word_min_texts,
                word_vectors=word_vectors,
            )  # fmt: skip
            typer.echo(str(path))
            return
        table = read_table(data, target, task, given)
        tr, cal = split(len(table.x), seed)
        if task == "classification":
            assert table.labels is not None
            # Stated, since /v1's probabilities and OIP's `label` index follow this order.
            said = "as --labels gives" if given is not None else "set it with --labels"
            typer.echo(f"classes in output order: {table.labels} ({said})", err=True)
            for note in table.notes:
                typer.echo(f"note: {note}", err=True)
            absent = sorted(set(range(len(table.labels))) - set(table.y[tr].tolist()))
            if absent:
                missing = [table.labels[k] for k in absent]
                raise InvalidInputError(f"{data}: classes {missing} have no training rows")
            # What the calibration method needs of the calibration rows, asked before training.
            check_rows(
                calibration_method, table.y[cal], len(table.labels), flag=METHOD_FLAG,
                labels=table.labels,
            )  # fmt: skip
        check_free(out, bundle_name, version)
        xtr, ytr = table.x[tr], table.y[tr]
        if progress:
            typer.echo(f"training on {len(tr)} rows ({len(cal)} kept for calibration)", err=True)
        res = train_mlp(
            xtr,
            ytr,
            seed=seed,
            hidden=sizes,
            task=kind,
            epochs=epochs,
            progress=progress,
            noise=how,
        )
        for note in res.notes:
            typer.echo(f"note: {note}", err=True)
        fm = res.final
        module = served_module(fm)
        check_served(module, fm, table.x)
        training_ranges, valid_ranges = _ranges(xtr)
        noise_var = fixed_noise_var(fm)
        bundle = save(
            module,
            torch.as_tensor(xtr[:4], dtype=torch.float32),
            out_dir=out,
            name=bundle_name,
            version=version,
            task=kind,
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
            typer.echo(f"wrote {bundle}; calibrating on {len(cal)} rows", err=True)
        result = calibrate_written(
            bundle,
            partial(_write_calibration_csv, table=table, rows=cal),
            out,
            bundle_name,
            seed,
            calibration_method,
        )
    except (McServeError, OSError) as exc:
        raise fail(str(getattr(exc, "message", exc))) from None
    for w in result.warnings:
        typer.echo(f"warning: {w}", err=True)
    typer.echo(str(result.path))
