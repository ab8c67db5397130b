"""The two versions `train` writes: checked before training, and all or nothing after it.

Before any training (minutes for a text model), the name and `--version` are checked against
the manifest's patterns and the version must be free: an invalid one used to fail only when the
manifest was written, after training, leaving files behind (outside `<out>/<name>/` for
"../escape"). After training, version N is written and calibrated into N + 1; when that
calibration fails, version N is removed again, so no ready but uncalibrated version is left to
be served or to block a rerun with "already exists".
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from service.calibration.recalibration import Result, calibrate_bundle
from service.errors import BundleError, InvalidInputError, McServeError, ModelError
from service.packaging import destination

METHOD_FLAG = "--calibration-method"  # train's name for calibrate's --method
_PLAIN = (InvalidInputError, BundleError, ModelError)  # re-raised with the message prefixed


def check_names(name: str, version: str) -> None:
    """Refuse a name or version no bundle may have (the manifest's patterns)."""
    try:
        destination.check(name, version)
    except BundleError as exc:
        raise InvalidInputError(f"--{exc.message}") from None  # "--version '../x': use ..."


def check_free(out: Path, name: str, version: str) -> None:
    """Refuse a version that already exists (asked again, atomically, when it is written)."""
    destination.refuse_existing(out / name / version)


def calibrate_written(
    bundle: Path,
    write_csv: Callable[[Path], None],
    out: Path,
    name: str,
    seed: int,
    method: str,
) -> Result:
    """Calibrate the version just written at ``bundle`` on the rows ``write_csv`` writes (into
    a temporary CSV), into the next version; on failure remove ``bundle`` and raise."""
    try:
        with tempfile.TemporaryDirectory(prefix="mcserve-train-") as tmp:
            cal_csv = Path(tmp) / f"{name}-calibration.csv"
            write_csv(cal_csv)
            return calibrate_bundle(
                bundle, cal_csv, out, seed=seed, method=method, method_flag=METHOD_FLAG
            )
    except BaseException as exc:  # an interrupt too: nothing half-done is left behind
        destination.remove(bundle)
        if not isinstance(exc, McServeError):
            raise
        kind = type(exc) if type(exc) in _PLAIN else McServeError
        raise kind(
            f"calibrating the trained model failed, so {bundle} was removed again: {exc.message}"
        ) from None
