"""The session's calibrated repository of tiny bundles (see calib_repo.py)."""

from __future__ import annotations

import pytest
from calib_repo import CAL_SAMPLES, Repo, build

from service.calibration.recalibration import calibrate_bundle


@pytest.fixture(scope="session")
def calibrated(tmp_path_factory: pytest.TempPathFactory) -> Repo:
    """`clf` and `reg` at version 1 (as saved) and 2 (calibrated on their calibration CSV)."""
    repo = build(tmp_path_factory.mktemp("calibrated") / "models")
    for name in ("clf", "reg"):
        calibrate_bundle(
            repo.root / name / "1",
            repo.data / f"{name}-calibration.csv",
            repo.root,
            samples=CAL_SAMPLES,
            seed=0,
        )
    return repo
