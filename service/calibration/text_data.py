"""Labelled texts for a text model's `calibrate` and `evaluate`: a CSV of a text column and the
target.

The text column is the column `train` read (the provenance's `text_column`), else `text`, else
the one column besides the target (so the CSV a model was trained from, or the calibration file
`train` writes, can be used as it is). The file is read as
`train` reads it (`csv_file.read_csv`); texts are tokenized exactly as a request is
(`service.engine.text.encode_texts`: same padding, cutting and checks).
Rows holding the same text share a group index: a text that carries several labels (the
medical abstracts do) can then be scored leniently, a prediction counting as right when it is
any of the text's labels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from service.bundle.manifest import Manifest
from service.calibration.csv_file import read_csv
from service.calibration.labelled import Labelled, read_targets, target_column, target_notes
from service.engine.text import encode_texts
from service.errors import InvalidInputError


def _text_column(header: list[str], target: str, path: Path, recorded: Any) -> str:
    # The column `train` read (its provenance's `text_column`) first: a model trained on
    # `title` was evaluated on a `text` column beside it (review R9). Its CSV may hold others.
    if isinstance(recorded, str) and recorded in header and recorded != target:
        return recorded
    if "text" in header and target != "text":
        return "text"
    others = [h for h in header if h != target]
    if len(others) != 1:
        raise InvalidInputError(
            f"{path}: a text model's CSV has a 'text' column (or exactly one column besides the "
            f"target {target!r}); the columns are {header}"
        )
    return others[0]


def read_texts(path: Path, manifest: Manifest, target: str | None, tokenizer: Any) -> Labelled:
    spec = manifest.inputs.text
    if spec is None or tokenizer is None:
        raise InvalidInputError(f"{manifest.name}: not a text model, or its tokenizer is missing")
    f = read_csv(path)
    header = f.header
    t_name = target_column(header, manifest, target, path)
    if t_name not in header:
        raise InvalidInputError(
            f"{path}: no target column {t_name!r} (another name: --target); columns {header}"
        )
    x_name = _text_column(header, t_name, path, manifest.training.provenance.get("text_column"))
    if not f.rows:
        raise InvalidInputError(f"{path}: no data rows")
    texts = f.column(x_name)
    y = read_targets(f.column(t_name), manifest, f.locate, t_name)
    try:
        batch = encode_texts(texts, tokenizer, spec, max_instances=len(texts))
    except InvalidInputError as exc:  # "instance i" is data row i + 1
        raise InvalidInputError(f"{path}: {f.instances_as_rows(exc.message)}") from None
    first: dict[str, int] = {}
    groups = np.array([first.setdefault(t, len(first)) for t in texts], dtype=np.int64)
    notes = target_notes(f.column(t_name), manifest)
    return Labelled(path, f.sha256, batch.ids, y, groups, notes)
