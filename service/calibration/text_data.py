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
from service.calibration.labelled import (
    Labelled,
    present_target,
    read_targets,
    target_notes,
    value_column,
)
from service.engine.text import encode_texts
from service.errors import InvalidInputError


def read_texts(path: Path, manifest: Manifest, target: str | None, tokenizer: Any) -> Labelled:
    spec = manifest.inputs.text
    if spec is None or tokenizer is None:
        raise InvalidInputError(f"{manifest.name}: not a text model, or its tokenizer is missing")
    f = read_csv(path)
    t_name = present_target(f.header, manifest, target, path)
    # The column `train` read (its provenance's `text_column`) first: a model trained on
    # `title` was evaluated on a `text` column beside it (review R9). Its CSV may hold others.
    recorded = manifest.training.provenance.get("text_column")
    what = "a text model's CSV has a 'text' column"
    x_name = value_column(f.header, t_name, path, "text", what, recorded)
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
