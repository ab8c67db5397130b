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


# medical-abstracts: (built, calibrated, method) pairs; the recipe's SERVED is the newest.
TEXT_PAIRS = [("1", "2", "temperature"), ("3", "4", "temperature"), ("3", "5", "vector"),
              ("6", "7", "vector"), ("8", "9", "vector")]  # fmt: skip


@pytest.mark.parametrize(("built", "calibrated", "method"), TEXT_PAIRS)
def test_medical_abstracts_calibrated_versions(built: str, calibrated: str, method: str) -> None:
    from models import medical_abstracts

    root = MODELS / medical_abstracts.NAME
    src, cal_b = load_bundle(root / built), load_bundle(root / calibrated)
    cal = cal_b.manifest.calibration
    assert cal is not None and cal.source == {"version": built, "digest": src.digest}
    assert cal_b.manifest.artifacts == src.manifest.artifacts
    assert cal.row_fingerprints == src.manifest.training.row_fingerprints["calibration"]
    assert (cal.class_scale is not None) == (method == "vector")
    newest = max(int(p.name) for p in root.iterdir() if p.name.isdigit())
    assert str(newest) == medical_abstracts.SERVED
    assert (medical_abstracts.VERSION, medical_abstracts.SERVED) in {p[:2] for p in TEXT_PAIRS}
    # Versions 8-9 carry the training texts' words (the unfamiliar-text referral), 1-7 do not.
    text = cal_b.manifest.inputs.text
    assert text is not None and (text.words is not None) == (int(built) >= 8)
    assert (cal_b.manifest.referral.unfamiliar_words is not None) == (int(built) >= 8)
