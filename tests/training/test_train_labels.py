"""Class labels `train` would have made too many of (service/training/classes.py,
service/calibration/targets.py), and the overlap warning's count of rows
(service/calibration/labelled.py)."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import numpy as np
import pytest

from service.bundle.fingerprint import row_fingerprint
from service.bundle.manifest import Manifest
from service.calibration.labelled import Labelled, overlaps
from service.errors import InvalidInputError
from service.training.classes import classes
from service.training.table import read_table

N = 40


def _csv(path: Path, targets: list[str]) -> Path:
    x = np.random.default_rng(0).uniform(-1, 1, size=(len(targets), 2)).round(4)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["a", "b", "y"])
        w.writerows([*map(float, r), t] for r, t in zip(x, targets, strict=True))
    return path


def test_labels_differing_only_in_case_or_spacing_are_refused_unless_listed() -> None:
    # 'NO', 'No' and 'no' had become three classes without a word.
    values = ["NO", "No", "no", "yes", "Yes", "no  risk", "no risk"] * 6
    with pytest.raises(InvalidInputError) as err:
        classes(values, None, str, Path("c.csv"), "y")
    assert err.value.message == (
        "c.csv: the target 'y' has labels that differ only in case or spacing: "
        "['NO', 'No', 'no'], ['Yes', 'yes'], ['no  risk', 'no risk']; if each group is one "
        "class, write it one way in the file; if they are different classes, list every class "
        "with --labels"
    )
    # One word in two Unicode forms (è as one code point, and as e + a combining grave) was
    # two classes that printed alike (review CSV): refused, the code points shown.
    nfc, nfd = "fi\u00e8vre", "fie\u0300vre"
    with pytest.raises(InvalidInputError) as err:
        classes([nfc, nfd, "normal"] * 6, None, str, Path("c.csv"), "y")
    said = err.value.message
    assert "written in two Unicode forms" in said and "['fie\\u0300vre', 'fi\\xe8vre']" in said
    assert "each group is one label: write it one way" in said and "--labels" not in said
    # Case and form together: each said as what it is (the form pair alone is one label, the
    # case pair two spellings --labels may keep apart: review R21).
    cap = "Fi\u00e8vre"
    with pytest.raises(InvalidInputError) as err:
        classes([nfc, nfd, cap, "normal"] * 6, None, str, Path("c.csv"), "y")
    said = err.value.message
    assert "Unicode forms (the same letters encoded two ways, code points shown): " in said
    assert "['fie\\u0300vre', 'fi\\xe8vre']; each group is one label" in said
    assert f"case or spacing: {[cap, nfc]}; if each group is one class" in said
    labels, _, _ = classes([nfc, nfd, cap, "normal"] * 6, [cap, nfc, "normal"], str, Path("c"), "y")
    assert labels == [cap, nfc, "normal"]
    # Apart in form and in spacing: two labels to `key` ("la  fièvre" composed, "la fièvre"
    # decomposed), so said as spacing, which --labels may keep apart; not as one label in two
    # forms (review R23).
    with pytest.raises(InvalidInputError) as err:
        classes(["la  " + nfc, "la " + nfd, "normal"] * 6, None, str, Path("c.csv"), "y")
    said = err.value.message
    assert "Unicode forms" not in said and "differ only in case or spacing" in said
    labels, _, _ = classes(
        ["la  " + nfc, "la " + nfd] * 6, ["la  " + nfc, "la " + nfc], str, Path("c"), "y"
    )
    assert labels == ["la  " + nfc, "la " + nfc]
    # ... and `--labels` in one form takes the other (one class); compatibility forms, which
    # print differently ("x2", "x²"), are two labels (NFC, not NFKC: review R19).
    labels, y, _ = classes([nfc, nfd, "normal"] * 6, [nfc, "normal"], str, Path("c.csv"), "y")
    assert labels == [nfc, "normal"] and y[:3].tolist() == [0, 0, 1]
    labels, _, _ = classes(["x2", "x\u00b2"] * 6, None, str, Path("c.csv"), "y")
    assert sorted(labels) == ["x2", "x\u00b2"]
    given = ["no", "No", "NO", "yes", "Yes", "no risk", "no  risk"]
    labels, y, _ = classes(values, given, str, Path("c.csv"), "y")
    assert labels == given and y[:3].tolist() == [2, 1, 0]
    # Numbers are compared by value, not as text: "1E3" and "1e3" stay one class.
    labels, _, _ = classes(["1E3", "1e3", "2"] * 4, None, str, Path("c.csv"), "y")
    assert labels == ["2", "1E3"]


def test_a_question_mark_target_is_a_missing_value_unless_listed(tmp_path: Path) -> None:
    # '?' (UCI's missing value) became a class, though it is refused as a feature value.
    values = [["yes", "no"][i % 2] for i in range(N)]
    values[3] = "?"
    data = _csv(tmp_path / "q.csv", values)
    with pytest.raises(InvalidInputError) as err:
        read_table(data, "y", "classification")
    assert err.value.message.endswith(
        "data row 4 (line 5), target 'y': '?' marks a missing value (a missing value, not a "
        "class); fill it in or drop the row, or list it in --labels if it is a class"
    )
    table = read_table(data, "y", "classification", ["yes", "no", "?"])
    assert table.labels == ["yes", "no", "?"] and int(table.y[3]) == 2


def test_the_overlap_warning_counts_rows_not_distinct_rows() -> None:
    # 40 rows of 3 binary features (8 distinct rows): "8 of the 40" when all 40 were trained on.
    x = np.random.default_rng(0).integers(0, 2, size=(N, 3)).astype(np.float32)
    data = Labelled(Path("cal.csv"), "0" * 64, x, np.zeros(N, dtype=np.int64))
    fps = row_fingerprint(x)
    assert len(set(fps)) <= 8
    manifest = SimpleNamespace(
        training=SimpleNamespace(row_fingerprints={"train": fps[:5] + fps}), calibration=None
    )
    said = overlaps(data, cast(Manifest, manifest), "calibration", ("train",), calibrated=False)
    assert said == [
        f"{N} of the {N} calibration rows are among the bundle's train rows (row fingerprints): "
        "numbers on them are optimistic"
    ]
