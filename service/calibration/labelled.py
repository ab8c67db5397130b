"""Labelled data for `calibrate` and `evaluate`, whatever the file held (feature rows or texts):
the targets read from their column, and which rows the bundle was already trained or calibrated
on. Read by `data` (feature CSVs) and `text_data` (text CSVs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.bundle.fingerprint import row_fingerprint
from service.bundle.manifest import Manifest
from service.calibration import targets
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
    notes: tuple[str, ...] = ()  # how the file was read, to warn about (targets as indices)

    @property
    def n(self) -> int:
        return int(self.x.shape[0])

    def fingerprints(self) -> list[str]:
        return row_fingerprint(self.x)


def read_targets(
    raw: list[str], manifest: Manifest, where: Callable[[int], str], column: str
) -> np.ndarray:
    """The target ``column``'s values (``where(i)`` names row i): numbers for a regressor,
    class indices for a classifier (`targets.class_indices`: labels, numbers equal by value to
    numeric labels, or indices when no label is a number)."""
    if manifest.task == "regression":
        values = [
            targets.read_number(v.strip(), f"{where(i)}, target {column!r}")
            for i, v in enumerate(raw)
        ]
        return np.array(values, dtype=np.float64)
    assert manifest.outputs.labels is not None
    return targets.class_indices(raw, manifest.outputs.labels, where)


def target_notes(raw: list[str], manifest: Manifest) -> tuple[str, ...]:
    """What to warn about how the target column was read (`targets.index_note`)."""
    labels = manifest.outputs.labels
    note = targets.index_note(raw, labels) if labels is not None else None
    return (note,) if note is not None else ()


def target_column(header: list[str], manifest: Manifest, given: str | None, path: Path) -> str:
    """``given`` (`--target`), else 'target', else the manifest's target name or the column
    `train --target` read (the provenance's `target_column`), so the CSV a model was trained
    from can be used as it is."""
    if given is not None:
        if given not in header:
            raise InvalidInputError(f"{path}: no target column {given!r}; the columns are {header}")
        return given
    # A classifier has no `outputs.target`: its training column is only in the provenance.
    recorded = manifest.training.provenance.get("target_column")
    for named in (manifest.outputs.target, recorded):
        if "target" not in header and isinstance(named, str) and named in header:
            return named
    return "target"


def present_target(header: list[str], manifest: Manifest, given: str | None, path: Path) -> str:
    """The target column (target_column), which the file must have."""
    name = target_column(header, manifest, given, path)
    if name not in header:
        raise InvalidInputError(
            f"{path}: no target column {name!r} (another name: --target); columns {header}"
        )
    return name


def value_column(
    header: list[str], target: str, path: Path, name: str, what: str, recorded: object = None
) -> str:
    """The one column a text or audio model reads: `recorded` (the one `train` read) where the
    file has it, else `name`, else the one column besides the target. `what`: the form the
    refusal describes ("a text model's CSV has a 'text' column")."""
    if isinstance(recorded, str) and recorded in header and recorded != target:
        return recorded
    if name in header and target != name:
        return name
    others = [h for h in header if h != target]
    if len(others) != 1:
        raise InvalidInputError(
            f"{path}: {what} (or exactly one column besides the target {target!r}); the columns "
            f"are {header}"
        )
    return others[0]


def overlaps(
    data: Labelled, manifest: Manifest, what: str, parts: tuple[str, ...], *, calibrated: bool
) -> list[str]:
    """Sentences for rows of ``data`` that are among the bundle's rows of ``parts`` (keys of
    ``training.row_fingerprints``) or, with ``calibrated``, its calibration section's rows."""
    mine = data.fingerprints()  # one per row: rows, not distinct rows, are counted
    named = {p: set(manifest.training.row_fingerprints.get(p, [])) for p in parts}
    if calibrated and manifest.calibration is not None:
        cal = set(manifest.calibration.row_fingerprints)
        # `train` records its calibration rows in both sections: one warning, not two.
        if named.get("calibration") != cal:
            named["calibrate"] = cal
    out = []
    for part, fps in named.items():
        n = sum(fp in fps for fp in mine)
        if n:
            out.append(
                f"{n} of the {data.n} {what} rows are among the bundle's {part} rows "
                f"(row fingerprints): numbers on them are optimistic"
            )
    return out
