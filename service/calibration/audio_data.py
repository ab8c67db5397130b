"""Labelled clips for an audio model's `calibrate` and `evaluate`: a CSV of WAV file paths and
the target.

The path column is `audio`, else the one column besides the target; a relative path is read
from the CSV's own folder (a data set moved whole keeps working). Each file is read and turned
into features exactly as a request's clip is (`service.engine.clips.audio_batch`: the same
decoding, padding, cutting and checks), so a model is calibrated on what it will be served.
"""

from __future__ import annotations

from pathlib import Path

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
from service.engine.clips import audio_batch, read_clip_file
from service.errors import InvalidInputError, McServeError


def read_clips(path: Path, manifest: Manifest, target: str | None) -> Labelled:
    spec = manifest.inputs
    if spec.audio is None:
        raise InvalidInputError(f"{manifest.name}: not an audio model")
    f = read_csv(path)
    t_name = present_target(f.header, manifest, target, path)
    what = "an audio model's CSV has an 'audio' column of WAV file paths"
    a_name = value_column(f.header, t_name, path, "audio", what)
    if not f.rows:
        raise InvalidInputError(f"{path}: no data rows")
    names = [n.strip() for n in f.column(a_name)]
    y = read_targets(f.column(t_name), manifest, f.locate, t_name)
    # One file at a time: a data set's files are never all in memory, only their features.
    x = np.empty((len(names), *spec.shape), dtype=np.float32)
    for i, name in enumerate(names):
        file = path.parent / name  # an absolute name stays itself
        where = f"{path}: {f.where(i)}, column {a_name!r}"
        if not name:
            raise InvalidInputError(f"{where}: the path is empty")
        clip = read_clip_file(file, spec.audio, where)
        try:
            x[i] = audio_batch([clip], spec, max_instances=1).x[0]
        except McServeError as exc:  # a file over the limit too; "instance 0" is data row i + 1
            raise InvalidInputError(f"{path}: {f.instances_as_rows(exc.message, [i])}") from None
    return Labelled(path, f.sha256, x, y, notes=target_notes(f.column(t_name), manifest))
