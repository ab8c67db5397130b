"""`python -m service train`: an MC-dropout model from a CSV file, bundled and calibrated.

This module reads the flags and picks the branch: `table_cli` for numeric columns (an MLP),
`text_cli` for a column of free text (`--text-column`, or detected when it is the only column
besides the target: `text_data.text_column`). Flags that belong to the other kind of data are
refused (`options.py`).

The rows are shuffled with `--seed` and cut 80/20 into training and calibration rows. The
trainer (`train_mlp`, the protocol of Gal & Ghahramani) holds out the last 20 % of the training
rows to choose (dropout rate, tau) on validation log-likelihood and refits the chosen
configuration on all training rows. The served module bakes both standardisations into the
graph, `Affine(x_mean, x_std)`, the fitted layers, and for a regressor `Affine` back to the
target's units, so clients send raw feature values and get answers in the target's units.

A classifier's classes are ordered as `--labels` lists them, else numeric labels by value and
other labels sorted as text (scikit-learn's order); the order is printed, since /v1's
probabilities and OIP's `label` index follow it. The bundle (version
`--version`) is then calibrated exactly as `python -m service calibrate` would be, on the
calibration rows, into the next version, whose path is printed. What can be checked is checked
before training (the CSV, `--seed`, the name and version, `--out`, what the calibration method
needs of the calibration rows, and the calibration rows themselves as calibrate will read them);
both versions are written in a hidden directory and renamed into place at
the end, so a failed calibration or a SIGTERM leaves neither behind (versions.py).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal, cast

import typer

from service.engine.masks import MAX_SEED
from service.errors import InvalidInputError, McServeError
from service.training import options
from service.training.mlp import Noise
from service.training.versions import check_names


def default_name(path: Path) -> str:
    name = re.sub(r"[^a-z0-9._-]+", "-", path.stem.lower()).lstrip("._-")[:64].rstrip("._-")
    return name or "model"


# Where a flag's value came from that counts as given by the user (not its default)
GIVEN = ("COMMANDLINE", "ENVIRONMENT")


def train(
    ctx: typer.Context,
    data: Annotated[Path, typer.Option(help="CSV with a header: numeric features + target")],
    target: Annotated[str, typer.Option(help="the target column")],
    task: Annotated[str, typer.Option(help="regression or classification")],
    out: Annotated[Path, typer.Option(help="model repository: writes OUT/<name>/<version>/")],
    hidden: Annotated[
        str, typer.Option(help="tabular: hidden layer sizes, comma separated")
    ] = "64,64",
    name: Annotated[str | None, typer.Option(help="bundle name (default: the CSV's stem)")] = None,
    version: Annotated[str, typer.Option(help="version of the uncalibrated bundle")] = "1",
    seed: Annotated[int, typer.Option(help="split, training and mask seed")] = 0,
    epochs: Annotated[int, typer.Option(help="training epochs per configuration")] = 400,
    progress: Annotated[bool, typer.Option(help="show training progress")] = False,
    labels: Annotated[
        str | None,
        typer.Option(
            help="classification: the classes in output order, comma separated, e.g. "
            "low,medium,high; quote a label that holds a comma: '\"yes, severe\",no' "
            "(default: numeric labels by value, others sorted as text)"
        ),
    ] = None,
    noise: Annotated[
        str,
        typer.Option(help="tabular regression: fixed (one fitted level) or learned (per input)"),
    ] = "fixed",
    # Text data (issue 21): docs/TRAINING_TEXT.md; `service.training.text_cli` does the work.
    text_column: Annotated[
        str | None,
        typer.Option(
            help="text: the column of texts (default: detected when it is the only column "
            "besides the target)"
        ),
    ] = None,
    arch: Annotated[
        str, typer.Option(help="text: textcnn, bilstm, transformer, fasttext or tfidf")
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
    ignore: Annotated[
        str | None,
        typer.Option(
            help="tabular: columns that are not features (an identifier, a date), comma "
            "separated; calibrate and evaluate leave them out of the same CSV too"
        ),
    ] = None,
    calibration_method: Annotated[
        str,
        typer.Option(
            help="classification: temperature, vector (per-class scale and bias) or auto, as "
            "`calibrate --method`"
        ),
    ] = "temperature",
) -> None:
    """Train an MC-dropout model on a CSV, bundle it and calibrate it (prints the bundle path)."""
    from service.calibration.selection import METHODS

    def fail(msg: str) -> typer.Exit:
        typer.echo(f"error: {msg}", err=True)
        return typer.Exit(2)

    if task not in ("regression", "classification"):
        raise fail(f"--task {task!r}: use regression or classification")
    if epochs < 1:
        raise fail("--epochs must be >= 1")
    if not 0 <= seed <= MAX_SEED:  # numpy, torch and the masks each failed on it, some late
        raise fail(f"--seed {seed}: use 0..2**63 - 1 (the seeds a request and `calibrate` take)")
    if labels is not None and task != "classification":
        raise fail("--labels is for --task classification; a regressor has no classes")
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
        sizes = options.hidden_sizes(hidden)
        given = options.class_labels(labels)
        left_out = options.ignored_columns(ignore)
        # Before any training: a bad name or version is refused now, not when the bundle is
        # written (versions.py).
        check_names(bundle_name, version)
        from service.training.text_data import text_column as choose_text_column

        text_col = choose_text_column(data, target, text_column)
        # Flags given, at any value (typer's vendored click: its ParameterSource by name)
        said = {p for p in ctx.params if getattr(ctx.get_parameter_source(p), "name", "") in GIVEN}
        options.refuse_other_kind(said, text=text_col, data=str(data))
        if text_col is not None:
            from service.training.text_cli import train_text

            if task != "classification":
                raise InvalidInputError(
                    f"{data}: the column {text_col!r} holds free text, and a text model is a "
                    "classifier (--task classification); text regression is not implemented"
                )
            path = train_text(
                data=data, target=target, text_column=text_col, out=out, name=bundle_name,
                version=version, seed=seed, max_epochs=epochs, progress=progress,
                labels_given=given, arch=arch, splits=splits, max_tokens=max_tokens,
                calibration_method=calibration_method, word_min_texts=word_min_texts,
                word_vectors=word_vectors,
            )  # fmt: skip
        else:
            from service.training.table_cli import train_table

            path = train_table(
                data=data, target=target, task=kind, out=out, name=bundle_name,
                version=version, seed=seed, epochs=epochs, progress=progress,
                labels_given=given, hidden=sizes, noise=how,
                calibration_method=calibration_method, ignore=left_out,
            )  # fmt: skip
    except (McServeError, OSError) as exc:
        raise fail(str(getattr(exc, "message", exc))) from None
    typer.echo(str(path))
