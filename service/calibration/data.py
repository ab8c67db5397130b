"""Labelled rows from a CSV file: the manifest's feature names as columns, plus the target
(`target`, the manifest's target name, or the column `--target` names).

Used by `calibrate` and `evaluate`. Columns are matched by name (order does not matter, extra
columns are refused so a typo is not silently ignored); flat rows are reshaped to the model's
input shape (digits: px0..px63 -> [1, 8, 8], row-major). Classifier targets are class indices
into `outputs.labels`, or the labels themselves.
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from service.bundle.manifest import Manifest
from service.calibration.labelled import Labelled, read_targets, target_column
from service.calibration.text_data import read_texts
from service.engine.inputs import to_array
from service.errors import InvalidInputError


def read(
    path: Path | str, manifest: Manifest, target: str | None = None, tokenizer: Any = None
) -> Labelled:
    """Read and check a labelled CSV for ``manifest``'s model (``target``: the target column's
    name, see `labelled.target_column`). A text model's CSV (``tokenizer``: the bundle's) is read by
    `service.calibration.text_data.read_texts`."""
    path = Path(path)
    if manifest.inputs.text is not None:
        return read_texts(path, manifest, target, tokenizer)
    raw = path.read_bytes()
    names = manifest.inputs.feature_names
    if names is None:
        raise InvalidInputError(
            f"{manifest.name}: the manifest has no feature names, so a CSV cannot be matched"
        )
    rows = list(csv.reader(raw.decode().splitlines()))
    if not rows:
        raise InvalidInputError(f"{path}: empty file")
    header, body = rows[0], [r for r in rows[1:] if r]
    # A multi-output regressor's targets are columns named after them; otherwise one target
    # column (see labelled.target_column).
    multi = manifest.outputs.targets is not None
    targets = (
        manifest.outputs.target_names if multi else [target_column(header, manifest, target, path)]
    )
    missing = [n for n in [*names, *targets] if n not in header]
    unknown = sorted(set(header) - {*names, *targets})
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
    if not body:
        raise InvalidInputError(f"{path}: no data rows")
    col = {n: header.index(n) for n in header}
    try:
        flat = np.array([[float(r[col[n]]) for n in names] for r in body], dtype=np.float64)
    except (ValueError, IndexError) as exc:
        raise InvalidInputError(
            f"{path}: a feature value is missing or not a number ({exc})"
        ) from None
    if multi:
        cols = [read_targets([r[col[t]] for r in body], manifest, path) for t in targets]
        y = np.stack(cols, axis=1)  # [N, targets]
    else:
        y = read_targets([r[col[targets[0]]] for r in body], manifest, path)
    shaped = flat.reshape(len(body), *manifest.inputs.shape)
    # The same checks as a request (finite, hard valid ranges), without the request size limit.
    try:
        x = to_array(shaped.tolist(), manifest.inputs, max_instances=len(body))
    except InvalidInputError as exc:  # "instance i" is data row i (0-based, header excluded)
        raise InvalidInputError(f"{path}: {exc.message}") from None
    return Labelled(path, hashlib.sha256(raw).hexdigest(), x, y)
