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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.bundle.fingerprint import row_fingerprint
from service.bundle.manifest import Manifest
from service.engine.inputs import to_array
from service.errors import InvalidInputError


@dataclass(frozen=True)
class Labelled:
    path: Path
    sha256: str  # of the file's bytes
    x: np.ndarray  # [N, *input_shape] float32, checked against the hard valid ranges
    y: np.ndarray  # [N] int64 class indices or float64 targets; [N, k] for k targets
    # Text data: per row, the index of its distinct text (rows with the same text share it), so
    # a text that carries several labels can be scored leniently; None for other data.
    groups: np.ndarray | None = None

    @property
    def n(self) -> int:
        return int(self.x.shape[0])

    def fingerprints(self) -> list[str]:
        return row_fingerprint(self.x)


def _targets(raw: list[str], manifest: Manifest, path: Path) -> np.ndarray:
    labels = manifest.outputs.labels
    if manifest.task == "regression":
        try:
            return np.array([float(v) for v in raw], dtype=np.float64)
        except ValueError as exc:
            raise InvalidInputError(f"{path}: target is not a number ({exc})") from None
    assert labels is not None
    out = []
    for i, v in enumerate(raw):
        if v in labels:
            out.append(labels.index(v))
            continue
        try:
            k = float(v)
        except ValueError:
            raise InvalidInputError(f"{path}: row {i + 1}: unknown label {v!r}") from None
        if k != int(k) or not 0 <= k < len(labels):
            raise InvalidInputError(
                f"{path}: row {i + 1}: target {v!r} is not a class index 0..{len(labels) - 1}"
            )
        out.append(int(k))
    return np.array(out, dtype=np.int64)


def _target_column(header: list[str], manifest: Manifest, given: str | None, path: Path) -> str:
    """``given`` (`--target`), else 'target', else the manifest's target name (what `train
    --target` recorded), so the CSV a model was trained from can be used as it is."""
    if given is not None:
        if given not in header:
            raise InvalidInputError(f"{path}: no target column {given!r}; the columns are {header}")
        return given
    named = manifest.outputs.target
    if "target" not in header and named and named in header:
        return named
    return "target"


def read(
    path: Path | str, manifest: Manifest, target: str | None = None, tokenizer: Any = None
) -> Labelled:
    """Read and check a labelled CSV for ``manifest``'s model (``target``: the target column's
    name, see `_target_column`). A text model's CSV (``tokenizer``: the bundle's) is read by
    `service.calibration.text_data.read_texts`."""
    path = Path(path)
    if manifest.inputs.text is not None:
        from service.calibration.text_data import read_texts

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
    # column (see _target_column).
    multi = manifest.outputs.targets is not None
    targets = (
        manifest.outputs.target_names if multi else [_target_column(header, manifest, target, path)]
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
        cols = [_targets([r[col[t]] for r in body], manifest, path) for t in targets]
        y = np.stack(cols, axis=1)  # [N, targets]
    else:
        y = _targets([r[col[targets[0]]] for r in body], manifest, path)
    shaped = flat.reshape(len(body), *manifest.inputs.shape)
    # The same checks as a request (finite, hard valid ranges), without the request size limit.
    try:
        x = to_array(shaped.tolist(), manifest.inputs, max_instances=len(body))
    except InvalidInputError as exc:  # "instance i" is data row i (0-based, header excluded)
        raise InvalidInputError(f"{path}: {exc.message}") from None
    return Labelled(path, hashlib.sha256(raw).hexdigest(), x, y)


def overlaps(
    data: Labelled, manifest: Manifest, what: str, parts: tuple[str, ...], *, calibrated: bool
) -> list[str]:
    """Sentences for rows of ``data`` that are among the bundle's rows of ``parts`` (keys of
    ``training.row_fingerprints``) or, with ``calibrated``, its calibration section's rows."""
    mine = set(data.fingerprints())
    named = {p: set(manifest.training.row_fingerprints.get(p, [])) for p in parts}
    if calibrated and manifest.calibration is not None:
        cal = set(manifest.calibration.row_fingerprints)
        # `train` records its calibration rows in both sections: one warning, not two.
        if named.get("calibration") != cal:
            named["calibrate"] = cal
    out = []
    for part, fps in named.items():
        n = len(mine & fps)
        if n:
            out.append(
                f"{n} of the {data.n} {what} rows are among the bundle's {part} rows "
                f"(row fingerprints): numbers on them are optimistic"
            )
    return out
