"""The text branch of `python -m service train` (see `service.training.text` for the steps)."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import typer

from service.bundle.spec import TextInput
from service.calibration.selection import check_rows
from service.engine.text import encode_texts
from service.errors import InvalidInputError
from service.packaging.writer import TOKENIZER_FILE
from service.training.classes import check_trained, classes
from service.training.table import numeric
from service.training.text import (
    check_embedded,
    fingerprints,
    fit_text,
    mc_metrics,
    provenance,
    save_text_bundle,
    write_text_csv,
)
from service.training.text_data import (
    TextTable,
    encode,
    read_splits,
    read_text_table,
    train_tokenizer,
    training_words,
)
from service.training.text_nets import ARCHS, Arch
from service.training.versions import METHOD_FLAG, check_free, write_calibrated
from service.training.word_vectors import read_vectors

CALIBRATION_FRACTION = 0.2


def train_text(
    *,
    data: Path,
    target: str,
    text_column: str,
    out: Path,
    name: str,
    version: str,
    seed: int,
    max_epochs: int,
    progress: bool,
    labels_given: list[str] | None,
    arch: str,
    splits: Path | None,
    max_tokens: int,
    calibration_method: str = "temperature",
    word_min_texts: int = 2,
    word_vectors: Path | None = None,
) -> Path:
    """Train, save version `version`, calibrate into the next; returns the calibrated path."""
    if arch not in ARCHS:
        raise InvalidInputError(f"--arch {arch!r}: use one of {', '.join(ARCHS)}")
    if not 8 <= max_tokens <= 4096:
        raise InvalidInputError(f"--max-tokens {max_tokens}: use 8..4096 (e.g. 256)")
    if word_min_texts < 0:
        raise InvalidInputError(
            f"--word-min-texts {word_min_texts}: use 0 (no word list) or a count of texts, e.g. 2"
        )
    table = read_text_table(data, target, text_column)
    if all(numeric(t) for t in table.texts):  # --text-column on the wrong column, most likely
        typer.echo(
            f"note: every value of the text column {text_column!r} is a number: a text model "
            "reads numbers as words (one written unlike every training value is unknown to it); "
            "for a numeric feature, train a tabular model (leave out --text-column)",
            err=True,
        )
    n = len(table.texts)
    if splits is not None:
        parts = read_splits(splits, n)
        how = f"{splits.name}: given train/calibration/test rows"
    else:
        perm = np.random.default_rng(seed).permutation(n)
        n_cal = round(CALIBRATION_FRACTION * n)
        parts = {"train": np.sort(perm[n_cal:]), "calibration": np.sort(perm[:n_cal])}
        how = "numpy default_rng(seed).permutation, cut 80/20 (train/calibration)"
    labels, y, notes = classes(table.values, labels_given, table.file.locate, data, target)
    if len(labels) < 2:
        raise InvalidInputError(f"{data}: the target {target!r} has fewer than 2 classes")
    how_order = "as --labels gives" if labels_given is not None else "set it with --labels"
    typer.echo(f"classes in output order: {labels} ({how_order})", err=True)
    for note in notes:
        typer.echo(f"note: {note}", err=True)
    tr, cal = parts["train"], parts["calibration"]
    if splits is not None:
        why = f"{splits.name} names all their rows calibration or test"
        fix = f"name some of them train in {splits.name}"
    else:
        why = "the seeded 80/20 cut put them among the calibration rows"
        fix = "add rows of these classes, or try another --seed"
    check_trained(labels, y, tr, data, why, fix)
    # What the calibration method needs of the calibration rows, asked before training.
    check_rows(calibration_method, y[cal], len(labels), flag=METHOD_FLAG, labels=labels)
    if progress:
        typer.echo(
            f"text column {text_column!r}: training on {len(tr)} rows ({len(cal)} kept for "
            "calibration)",
            err=True,
        )
    train_texts = [table.texts[i] for i in tr]  # the tokenizer sees these and nothing else
    vectors = None
    if word_vectors is not None:
        check_embedded(arch)
        vectors = read_vectors(word_vectors, training_words(train_texts))
    check_free(out, name, version)
    # Fitted here (cheap, deterministic) so that the calibration texts are checked with it now:
    # one it cannot read failed the calibrate step, after the whole training.
    tokenizer = train_tokenizer(train_texts)
    _check_calibration_texts(table, cal, tokenizer, max_tokens)
    result = fit_text(
        train_texts,
        y[tr],
        len(labels),
        arch=arch_of(arch),
        max_tokens=max_tokens,
        seed=seed,
        max_epochs=max_epochs,
        progress=progress,
        word_vectors=vectors,
        tokenizer=tokenizer,
    )
    ids = encode(result.tokenizer, table.texts, max_tokens)
    split_info = {"method": how} | {k: len(v) for k, v in parts.items()}

    def write(repo: Path) -> Path:
        bundle = save_text_bundle(
            result,
            ids[tr],
            out=repo,
            name=name,
            version=version,
            labels=labels,
            target=target,
            intended_use=f"trained from {data.name} by `python -m service train`; "
            "not validated for clinical use",
            # target_column: `calibrate` and `evaluate` find the target in this CSV by it.
            provenance=provenance(table, result, split_info, seed)
            | {"target_column": target, "build_command": "python -m service train"},
            metrics={
                f"calibration_{k}": v
                for k, v in mc_metrics(result.module, ids[cal], y[cal], seed).items()
            },
            fingerprints=fingerprints(ids, parts),
            training_texts=[table.texts[i] for i in tr] if word_min_texts else None,
            word_min_texts=word_min_texts or 2,
        )
        if progress:
            typer.echo(
                f"stopped after {result.epochs_run} epochs (best {result.best_epoch}); saved "
                f"version {version}; calibrating on {len(cal)} rows",
                err=True,
            )
        return bundle

    cal_texts, cal_targets = [table.texts[i] for i in cal], [labels[int(y[i])] for i in cal]
    res = write_calibrated(
        out, name, version, write,
        partial(write_text_csv, texts=cal_texts, targets=cal_targets), seed, calibration_method,
    )  # fmt: skip
    for w in res.warnings:
        typer.echo(f"warning: {w}", err=True)
    return Path(res.path)


def _check_calibration_texts(
    table: TextTable, cal: np.ndarray, tokenizer: Any, max_tokens: int
) -> None:
    """Refuse, naming its row of the user's CSV, a calibration text that the served model (and
    so the calibrate step) would refuse: one whose every token is unknown to the tokenizer
    fitted on the training rows (another script, or numbers written unlike any training one)."""
    if not len(cal):
        return
    spec = TextInput(tokenizer=TOKENIZER_FILE, max_tokens=max_tokens, pad_id=0)
    try:
        encode_texts([table.texts[i] for i in cal], tokenizer, spec, max_instances=len(cal))
    except InvalidInputError as exc:
        raise InvalidInputError(
            f"{table.path}: {table.file.instances_as_rows(exc.message, cal.tolist())} (a "
            "calibration row: the tokenizer is fitted on the training rows only, and none of "
            "them has its words); drop the row, or add training rows written like it"
        ) from None


def arch_of(arch: str) -> Arch:
    for a in ARCHS:
        if a == arch:
            return a
    raise InvalidInputError(f"--arch {arch!r}: use one of {', '.join(ARCHS)}")
