"""How `train` reads its CSV (service/calibration/csv_file.py, targets.py, training/classes.py):
classes equal by value, missing targets, values float32 cannot hold, quoted newlines, long
fields; every problem one line with exit code 2 and nothing written."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import Result
from train_cli import refused as _refused
from train_cli import train as _train
from typer.testing import CliRunner

from service.bundle.load import load_bundle
from service.cli import app
from service.errors import InvalidInputError, ModelError
from service.training import train_mlp
from service.training.classes import classes
from service.training.results import FittedMLP
from service.training.served import held_out_metrics
from service.training.table import read_table, split
from service.training.text_data import read_text_table

runner = CliRunner()
N = 40


def _csv(path: Path, targets: list[str], *, feature: str | None = None) -> Path:
    """a, b and y; ``feature`` replaces a's value on the first row."""
    x = np.random.default_rng(0).uniform(-1, 1, size=(len(targets), 2)).round(4)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["a", "b", "y"])
        for i, (row, t) in enumerate(zip(x, targets, strict=True)):
            a = feature if i == 0 and feature is not None else repr(float(row[0]))
            w.writerow([a, repr(float(row[1])), t])
    return path


def test_numeric_labels_equal_by_value_are_one_class(tmp_path: Path) -> None:
    # A column mixing 1 and 1.0 had trained 6 classes out of 3.
    values = [["1", "1.0", "2", "2.0", "3.0", "3"][i % 6] for i in range(N)]
    res = _train(_csv(tmp_path / "mixed.csv", values), tmp_path / "repo")
    assert res.exit_code == 0, res.output
    m = load_bundle(Path(res.stdout.strip().splitlines()[-1])).manifest
    assert m.outputs.labels == ["1", "2", "3.0"]  # each named as first written
    assert "note: the target values ['1', '1.0'] are one class '1' (equal numbers)" in res.stderr
    # --labels matches by value too, and may not name one class twice.
    table = read_table(tmp_path / "mixed.csv", "y", "classification", ["3", "2", "1"])
    assert table.labels == ["3", "2", "1"] and table.y[:6].tolist() == [2, 2, 1, 1, 0, 0]
    with pytest.raises(InvalidInputError, match=r"the labels \['1', '1.0'\] repeat a class"):
        read_table(tmp_path / "mixed.csv", "y", "classification", ["1", "1.0", "2", "3"])


def test_numeric_labels_are_compared_exactly() -> None:
    """Compared as float64, 17-digit codes were one class, "1e-400" was "0", and float() took
    "1_000" and Arabic-Indic digits for numbers."""
    codes = ["100000000000000001", "100000000000000002", "100000000000000003"]
    labels, y, notes = classes(codes * 2, None, str, Path("c.csv"), "y")
    assert labels == codes and y.tolist() == [0, 1, 2] * 2 and notes == []
    for a, b in (("1e-400", "0"), ("1_000", "1000"), ("\u0661", "1")):
        labels, _, notes = classes([a, b], None, str, Path("c.csv"), "y")
        assert sorted(labels) == sorted([a, b]) and notes == [], (a, b)
    labels, y, _ = classes(["1e3", "1000", "2"], None, str, Path("c.csv"), "y")
    assert labels == ["2", "1e3"] and y.tolist() == [1, 1, 0]  # equal by value, as before


@pytest.mark.parametrize(
    ("bad", "said"),
    [
        ("", "the value is empty"),
        ("NaN", "'NaN' is not a finite number"),
        ("nan", "'nan' is not a finite number"),
        ("NA", "'NA' marks a missing value"),
        # A spreadsheet's and a statistics package's marks were classes of their own (review CSV).
        ("-", "'-' marks a missing value"),
        (".", "'.' marks a missing value"),
        ("#NULL!", "'#NULL!' marks a missing value"),
        ("#DIV/0!", "'#DIV/0!' is a spreadsheet's error (a formula that failed), not a value"),
    ],
)
def test_missing_class_targets_are_refused_with_their_row(
    tmp_path: Path, bad: str, said: str
) -> None:
    values = [["low", "high"][i % 2] for i in range(N)]
    values[7] = bad
    data = _csv(tmp_path / "t.csv", values)
    res = _train(data, tmp_path / "repo")
    _refused(
        res,
        f"data row 8 (line 9), target 'y': {said} (a missing value, not a class)",
        tmp_path / "repo",
    )
    if bad == "NA":  # unless --labels says it is a class
        table = read_table(data, "y", "classification", ["low", "NA", "high"])
        assert table.labels == ["low", "NA", "high"] and int(table.y[7]) == 1


@pytest.mark.parametrize(
    ("feature", "target", "said"),
    [
        ("1e39", "0.5", "data row 1 (line 2), column 'a': '1e39' is beyond float32's range"),
        ("-4e38", "0.5", "column 'a': '-4e38' is beyond float32's range"),
        ("0.1", "1e200", "data row 1 (line 2), target 'y': '1e200' is beyond float32's range"),
        ("0.1", "1e39", "target 'y': '1e39' is beyond float32's range"),
        ("0.1", "nan", "target 'y': 'nan' is not a finite number"),
    ],
)
def test_values_float32_cannot_hold_are_refused(
    tmp_path: Path, feature: str, target: str, said: str
) -> None:
    # 1e39 as a feature failed as "does not reproduce the fitted model"; 1e200 as a target was a
    # math domain error traceback; 1e39 as a target wrote a bundle predicting about 2e37.
    targets = [target] + [str(0.1 * i) for i in range(1, N)]
    res = _train(
        _csv(tmp_path / "h.csv", targets, feature=feature), tmp_path / "repo", "regression"
    )
    _refused(res, said, tmp_path / "repo")


@pytest.mark.parametrize(
    ("cell", "said"),
    [
        # float() took these for numbers: a feature's training range reached 1234.5.
        ("1_234.5", "column 'a': '1_234.5' is not a number; the other values of 'a' are numbers"),
        ("\uff11", "column 'a': '\uff11' is not a number"),
        # A missing mark in a lab column was told to drop the column or train a text model.
        ("-", "column 'a': '-' marks a missing value; fill it in or drop the row"),
        ("#VALUE!", "column 'a': '#VALUE!' is a spreadsheet's error"),
        ("x", "column 'a': 'x' is not a number; the other values of 'a' are numbers: correct"),
        # A European spreadsheet's decimal comma (quoted, in a comma-separated file).
        ("36,9", "column 'a': '36,9' is not a number; a decimal comma? write 36.9"),
    ],
)
def test_a_feature_value_that_is_no_number_is_refused_with_its_fix(
    tmp_path: Path, cell: str, said: str
) -> None:
    data = _csv(tmp_path / "f.csv", [["low", "high"][i % 2] for i in range(N)], feature=cell)
    _refused(_train(data, tmp_path / "repo"), said, tmp_path / "repo")


@pytest.fixture(scope="module")
def fitted() -> FittedMLP:
    x = np.random.default_rng(1).normal(size=(40, 2))
    return train_mlp(x, x[:, 0], hidden=(4,), epochs=1, dropout_rates=(0.1,), val_passes=5).final


@pytest.mark.parametrize("tau", [0.0, float("inf"), float("nan")])
def test_an_unusable_noise_precision_is_a_clear_error(fitted: FittedMLP, tau: float) -> None:
    # A zero tau (a target of 1e200 squared past float64) was a math domain error traceback.
    broken = replace(fitted, tau=np.array([tau]))
    x = np.zeros((3, 2))
    with pytest.raises(ModelError, match=r"noise precision tau = .* rescale the target"):
        held_out_metrics(broken, x, np.zeros(3), seed=0)


def test_quoted_newlines_stay_in_their_label(tmp_path: Path) -> None:
    # str.splitlines() outside the parser had made "low\nrisk" two broken rows; U+2028 too.
    values = [["low\nrisk", "mid\u2028risk", "high"][i % 3] for i in range(N)]
    table = read_table(_csv(tmp_path / "q.csv", values), "y", "classification")
    assert table.labels == ["high", "low\nrisk", "mid\u2028risk"] and len(table.y) == N


def test_rows_swallowed_into_a_label_by_an_open_quote_are_refused(tmp_path: Path) -> None:
    """A quote left open swallows the rows up to one that ends a field with a quote (`6'2"`):
    csv's strict mode sees valid CSV, and train took the swallowed rows as one class (review
    R19). A label holding line breaks and commas is refused with the row it starts on."""
    lines = ["a,b,y"] + [f"0.{i},0.{i + 1},{'ab'[i % 2]}" for i in range(N)]
    lines[12] = '0.5,0.5,"tall'  # data row 12: its quote is closed three lines later
    lines[15] = "0.1,0.2,6'2\""
    data = tmp_path / "swallow.csv"
    data.write_text("\n".join(lines) + "\n")
    res = _train(data, tmp_path / "repo")
    _refused(
        res,
        "data row 12 (line 13), target 'y': the label holds line breaks and commas, like rows "
        "swallowed by a quote opened there and closed lines later",
        tmp_path / "repo",
    )


def _texts(path: Path, texts: list[str], labels: list[str]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["abstract", "condition"])
        w.writerows(zip(texts, labels, strict=True))
    return path


def _text_rows() -> tuple[list[str], list[str]]:
    words = {"cardio": "heart artery coronary", "onco": "tumour biopsy carcinoma"}
    labels = [["cardio", "onco"][i % 2] for i in range(N)]
    return [f"patients with {words[y]} were seen, case {i}" for i, y in enumerate(labels)], labels


def _train_text(data: Path, out: Path) -> Result:
    args = ["train", "--data", str(data), "--target", "condition", "--task", "classification"]
    return runner.invoke(
        app, [*args, "--out", str(out), "--epochs", "2", "--text-column", "abstract"]
    )


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("heart\x00 artery", "the text 'abstract' contains a NUL character"),
        ("word " * 30_000, "the text 'abstract' is 150,000 bytes, over the 100,000"),
        ("\u200b\u0301", "the text 'abstract' has no word a tokenizer reads"),
    ],
)
def test_texts_are_checked_as_requests_before_training(
    tmp_path: Path, text: str, said: str
) -> None:
    # A NUL in a calibration text failed after training ("instance 0" of a deleted temporary
    # file) and left version 1 behind; a field over 131,072 characters was a `_csv.Error`.
    texts, labels = _text_rows()
    texts[5] = text
    res = _train_text(_texts(tmp_path / "notes.csv", texts, labels), tmp_path / "repo")
    _refused(res, f"data row 6 (line 7): {said}", tmp_path / "repo")


def test_an_empty_text_target_is_refused_with_its_row(tmp_path: Path) -> None:
    texts, labels = _text_rows()
    labels[3] = " "
    data = _texts(tmp_path / "notes.csv", texts, labels)
    assert read_text_table(data, "condition", "abstract").values[3] == ""
    res = _train_text(data, tmp_path / "repo")
    _refused(res, "data row 4 (line 5), target 'condition': the value is empty", tmp_path / "repo")


def _not_trained(*args: Any, **kwargs: Any) -> None:
    raise AssertionError("trained before the calibration rows were checked")


def test_a_calibration_text_the_tokenizer_cannot_read_is_refused_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It failed the calibrate step after the whole training, naming a row of a deleted
    # temporary file: "none of the text's 3 token(s) is in this model's vocabulary".
    texts, labels = _text_rows()
    row = int(np.random.default_rng(0).permutation(N)[0])  # a calibration row at seed 0
    texts[row] = "Καρδιά και αίμα"  # a script no training text has
    monkeypatch.setattr("service.training.text_cli.fit_text", _not_trained)
    data = _texts(tmp_path / "notes.csv", texts, labels)
    res = _train_text(data, tmp_path / "repo")
    _refused(
        res,
        f"{data}: data row {row + 1} (line {row + 2}): none of the text's 3 token(s) is in "
        "this model's vocabulary",
        tmp_path / "repo",
    )
    assert "a calibration row: the tokenizer is fitted on the training rows only" in res.output
    assert "mcserve-train-" not in res.output


def test_a_calibration_value_outside_the_valid_ranges_is_refused_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As above for tabular data: the valid ranges were computed after training, and the row
    # refused by the calibrate step was "data row 1" of a deleted temporary file.
    _, cal = split(N, 3)  # train_cli.train's seed
    row = int(cal[0])
    x = np.random.default_rng(0).uniform(-1, 1, size=(N, 2)).round(4)
    x[row, 0] = 1000.0
    data = tmp_path / "out.csv"
    with data.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["a", "b", "y"])
        w.writerows([*map(float, r), "ab"[i % 2]] for i, r in enumerate(x))
    monkeypatch.setattr("service.training.table_cli.train_mlp", _not_trained)
    res = _train(data, tmp_path / "repo")
    _refused(
        res,
        f"{data}: data row {row + 1} (line {row + 2}), feature 'a' = 1000 is outside the valid "
        "range",
        tmp_path / "repo",
    )
    assert "(a calibration row: the valid ranges reach 10 widths of the training" in res.output
