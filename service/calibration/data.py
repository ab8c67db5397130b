"""Labelled rows from a CSV file: the manifest's feature names as columns, plus the target
(`target`, the manifest's target name, or the column `--target` names).

Used by `calibrate` and `evaluate`. Columns are matched by name (order does not matter, extra
columns are refused so a typo is not silently ignored); flat rows are reshaped to the model's
input shape (digits: px0..px63 -> [1, 8, 8], row-major). Classifier targets are the labels
(numbers equal by value to numeric labels) or, when no label is a number, class indices into
`outputs.labels` (`targets.class_indices`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from service.bundle.manifest import Manifest
from service.calibration.audio_data import read_clips
from service.calibration.csv_file import read_csv
from service.calibration.labelled import Labelled, read_targets, target_column, target_notes
from service.calibration.targets import read_number
from service.calibration.text_data import read_texts
from service.engine.inputs import to_array
from service.errors import InvalidInputError


def read(
    path: Path | str, manifest: Manifest, target: str | None = None, tokenizer: Any = None
) -> Labelled:
    """Read and check a labelled CSV for ``manifest``'s model (``target``: the target column's
    name, see `labelled.target_column`). A text model's CSV (``tokenizer``: the bundle's) is read by
    `service.calibration.text_data.read_texts`, an audio model's (WAV file paths) by
    `audio_data.read_clips`. All read the file as `train` does
    (`csv_file.read_csv`: UTF-8, quoted newlines, one field per header column)."""
    path = Path(path)
    if manifest.inputs.audio is not None:  # a column of WAV file paths
        return read_clips(path, manifest, target)
    if manifest.inputs.text is not None:
        return read_texts(path, manifest, target, tokenizer)
    names = manifest.inputs.feature_names
    if names is None:
        size = math.prod(manifest.inputs.shape)
        raise InvalidInputError(
            f"{manifest.name}: the manifest has no feature names, so a CSV cannot be matched "
            f"to its {size} input values; package it again with feature_names (one per value, "
            f'row-major, e.g. feature_names=[f"x{{i}}" for i in range({size})]) and write the '
            "CSV's columns under those names"
        )
    f = read_csv(path)
    header = f.header
    # A multi-output regressor's targets are columns named after them; otherwise one target
    # column (see labelled.target_column).
    multi = manifest.outputs.targets is not None
    targets = (
        manifest.outputs.target_names if multi else [target_column(header, manifest, target, path)]
    )
    missing = [n for n in [*names, *targets] if n not in header]
    # Columns `train --ignore` left out of the features: the same CSV calibrates and evaluates.
    left_out = manifest.training.provenance.get("ignored_columns")
    ignored = {c for c in left_out if isinstance(c, str)} if isinstance(left_out, list) else set()
    unknown = sorted(set(header) - {*names, *targets} - ignored)
    if missing or unknown:
        what = (
            f"the target names {targets}"
            if multi
            else f"the target {targets[0]!r} (another name: --target)"
        )
        raise InvalidInputError(
            f"{path}: columns must be the feature names plus {what}; "
            f"missing {missing}, unknown {unknown}"
        )
    if not f.rows:
        raise InvalidInputError(f"{path}: no data rows")
    col = {n: header.index(n) for n in header}
    flat = np.empty((len(f.rows), len(names)), dtype=np.float64)
    for i, r in enumerate(f.rows):
        for j, n in enumerate(names):
            # As train reads it (targets.read_number): float() took "-", "1_234" and "#N/A"'s
            # cousins inconsistently with train, and said no fix.
            flat[i, j] = read_number(
                r[col[n]].strip(),
                f"{path}: {f.where(i)}, column {n!r}",
                "; the model's features are numbers: correct it or drop the row",
            )
    if multi:
        cols = [read_targets(f.column(t), manifest, f.locate, t) for t in targets]
        y = np.stack(cols, axis=1)  # [N, targets]
    else:
        y = read_targets(f.column(targets[0]), manifest, f.locate, targets[0])
    shaped = flat.reshape(len(f.rows), *manifest.inputs.shape)
    # The same checks as a request (finite, hard valid ranges), without the request size limit.
    try:
        x = to_array(shaped.tolist(), manifest.inputs, max_instances=len(f.rows))
    except InvalidInputError as exc:
        raise InvalidInputError(f"{path}: {f.instances_as_rows(exc.message)}") from None
    notes = target_notes(f.column(targets[0]), manifest) if not multi else ()
    return Labelled(path, f.sha256, x, y, notes=notes)
