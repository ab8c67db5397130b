"""The committed calibrated versions `models/<name>/2/`: built from version 1 by `calibrate`,
which they name by digest (so version 1 is unchanged since), with the same artifacts."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.bundle import load_bundle
from service.engine.conformal import quantile

MODELS = Path(__file__).resolve().parents[2] / "models"
NAMES = ["breast-cancer", "diabetes", "digits"]


@pytest.mark.parametrize("name", NAMES)
def test_version_2_is_a_calibrated_copy_of_version_1(name: str) -> None:
    v1, v2 = load_bundle(MODELS / name / "1"), load_bundle(MODELS / name / "2")
    cal = v2.manifest.calibration
    assert cal is not None and v2.manifest.referral is not None
    assert cal.source == {"version": "1", "digest": v1.digest}
    assert v2.manifest.artifacts == v1.manifest.artifacts
    assert cal.data["file"] == f"{name}-calibration.csv" and cal.samples == 100
    # Calibrated on the build's calibration split, never on train or test rows.
    assert cal.row_fingerprints == v1.manifest.training.row_fingerprints["calibration"]
    assert v2.manifest.training == v1.manifest.training
    size = sum(f.stat().st_size for f in (MODELS / name / "2").iterdir())
    assert size < 2 * 1024 * 1024
    if v2.manifest.task == "regression":
        assert v2.manifest.defaults.interval == "conformal"
        assert quantile(cal.scores, 0.95) < float("inf")
    else:
        assert cal.temperature is not None and v2.manifest.referral.max_set_size == 1
