"""The `medical-abstracts` recipe is reproducible: two builds in fresh processes give identical
files. On the first 40 rows of each split and 3 epochs (seconds), not the full build (minutes):
the code path (tokenizer fitting, initialisation, shuffles, dropout, early stopping, export) is
the same."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from models import medical_abstracts
from tests.models.test_reproducible import build_twice

SCRIPT = (
    "import sys; from pathlib import Path; from models import medical_abstracts as m; "
    "out = Path(sys.argv[1]); m.build(out / 'bundles', out / 'data', limit=40, max_epochs=3)"
)


def test_two_subset_builds_give_identical_artifacts(tmp_path: Path) -> None:
    if not (medical_abstracts.DATA / "medical_tc_test.csv").is_file():  # a failure, not a skip
        pytest.fail(
            f"the medical abstracts data set is not at {medical_abstracts.DATA} (../shared "
            "beside the repository, or MCSERVE_MEDICAL_ABSTRACTS)"
        )
    cmd = [sys.executable, "-c", SCRIPT]
    first, second = build_twice(cmd, [tmp_path / "a", tmp_path / "b"])
    assert any(name.endswith("tokenizer.json") for name in first)
    assert any(name.endswith("weights.safetensors") for name in first)
    assert any(name.endswith("medical-abstracts-test.csv") for name in first)
    assert first == second
