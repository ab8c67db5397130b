"""What `train` makes of a CSV's columns before any training (service/training/table.py,
text_data.py): a column of free text beside numeric ones, values float32 cannot hold to a useful
precision, constant columns, missing values and a file that is not comma-separated. Every
refusal is one line, exit code 2, nothing written, and says how to fix the file."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from train_cli import refused as _refused
from train_cli import train as _train
from typer.testing import CliRunner

from service.cli import app
from service.errors import InvalidInputError, ModelError
from service.training import text_data, train_mlp
from service.training.served import check_served, served_module
from service.training.table import read_table

N = 40
NOTES = [
    "patient reports mild symptoms since the last visit, follow-up in two weeks",
    "no notes recorded for this visit at the clinic today, seen by the nurse",
]


def _write(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def _numbers(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, size=(N, 2)).round(4)


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_a_text_column_beside_numeric_ones_is_not_trained_alone(tmp_path: Path, task: str) -> None:
    # A tabular CSV with one column of notes had trained a text model on the notes alone,
    # dropping every numeric feature; for regression the refusal named no column.
    x = _numbers()
    y = ["yes", "no"] if task == "classification" else ["1.5", "2.5"]
    data = _write(
        tmp_path / "visits.csv",
        ["a", "b", "notes", "y"],
        [[*r, f"{NOTES[i % 2]} ({i})", y[i % 2]] for i, r in enumerate(x)],
    )
    res = _train(data, tmp_path / "repo", task)
    _refused(
        res,
        "the column 'notes' looks like free text, and a text model on it would ignore the other "
        "columns ['a', 'b']; to train on the text alone, pass --text-column notes; for a tabular "
        "model of the other columns, drop the column 'notes'",
        tmp_path / "repo",
    )
    assert text_data.text_column(data, "y", "notes") == "notes"  # named: the text alone, as asked
    alone = _write(tmp_path / "notes.csv", ["notes", "y"], [[NOTES[i % 2], "a"] for i in range(N)])
    assert text_data.text_column(alone, "y", None) == "notes"  # nothing else to lose: detected


def test_text_in_a_script_without_spaces_is_detected(tmp_path: Path) -> None:
    # Chinese texts have no spaces: the column was read as numbers ("'神元…' is not a number").
    rng = np.random.default_rng(0)
    chars = list("神元偏痴经大头呆中痫风痛肌心绞高脏动脉死梗压状")
    texts = ["".join(rng.choice(chars, 24)) for _ in range(N)]
    data = _write(
        tmp_path / "zh.csv", ["text", "label"], [[t, "脑心"[i % 2]] for i, t in enumerate(texts)]
    )
    assert text_data.detect_text_column(data, "label") == "text"
    # A short category in the same script is not text (it repeats; it is short).
    wards = _write(tmp_path / "w.csv", ["ward", "label"], [["心内科", "x"], ["神经科", "y"]] * 20)
    assert text_data.detect_text_column(wards, "label") is None


@pytest.mark.parametrize(("values", "noted"), [(["3", "4.5", "1e2"], True), (["3", "x"], False)])
def test_a_text_column_of_numbers_is_noted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, values: list[str], noted: bool
) -> None:
    # `--text-column` on a column of numbers trained a "text" model on them without a word.
    def stop(*args: object, **kwargs: object) -> None:
        raise InvalidInputError("stopped before training")

    monkeypatch.setattr("service.training.text_cli.fit_text", stop)
    rows = [[values[i % len(values)], "ab"[i % 2]] for i in range(N)]
    data = _write(tmp_path / "n.csv", ["num", "y"], rows)
    args = ["train", "--data", str(data), "--target", "y", "--task", "classification"]
    res = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "repo"), "--text-column", "num"])
    _refused(res, "stopped before training", tmp_path / "repo")
    note = (
        "note: every value of the text column 'num' is a number: a text model reads numbers as "
        "words"
    )
    assert (note in res.output) == noted, res.output


def test_a_column_that_is_not_numeric_says_what_to_do(tmp_path: Path) -> None:
    x = _numbers()
    wards = ["心内科", "神经科"]
    rows = [[r[0], wards[i % 2], "ab"[i % 2]] for i, r in enumerate(x)]
    data = _write(tmp_path / "w.csv", ["a", "ward", "y"], rows)
    with pytest.raises(InvalidInputError) as err:
        read_table(data, "y", "classification")
    said = err.value.message
    assert "column 'ward': '心内科' is not a number" in said
    assert "encode a category as numbers or drop the column" in said
    assert "if 'ward' is a column of free text, pass --text-column ward" in said


@pytest.mark.parametrize("marker", ["NA", "?", "null"])
def test_a_missing_feature_value_says_fill_it_in(tmp_path: Path, marker: str) -> None:
    rows: list[list[object]] = [[*r, "ab"[i % 2]] for i, r in enumerate(_numbers())]
    rows[5][1] = marker
    data = _write(tmp_path / "m.csv", ["a", "b", "y"], rows)
    res = _train(data, tmp_path / "repo")
    _refused(
        res,
        f"data row 6 (line 7), column 'b': {marker!r} marks a missing value; fill it in or drop "
        "the row",
        tmp_path / "repo",
    )


def test_a_file_with_another_delimiter_says_so(tmp_path: Path) -> None:
    data = tmp_path / "semi.csv"
    data.write_text("a;b;y\n" + "".join(f"{i / 10};{i};{'ab'[i % 2]}\n" for i in range(N)))
    res = _train(data, tmp_path / "repo")
    _refused(
        res,
        "no target column 'y'; the columns are ['a;b;y']; the file seems to use ';' as its "
        "delimiter: save it with ',' between the values",
        tmp_path / "repo",
    )
    # With decimal commas (a European spreadsheet's export) the rows split at them: that was
    # "data row 1 has 3 fields, the header 1: ... quote fields that hold commas" (review CSV).
    data.write_text("\ufeffa;b;y\r\n" + "".join(f"{i},5;{i};{'ab'[i % 2]}\r\n" for i in range(N)))
    res = _train(data, tmp_path / "repo")
    _refused(
        res,
        "data row 1 (line 2) has 2 fields, the header 1; the file seems to use ';' as its "
        "delimiter: save it with ',' between the values (comma-separated) and '.' as the "
        "decimal point",
        tmp_path / "repo",
    )


def test_a_target_far_from_zero_for_its_spread_is_refused(tmp_path: Path) -> None:
    # y = 1e9 + noise (std 0.58) was served as a constant: float32's step there is 64.
    x = _numbers()
    y = 1e9 + x[:, 0]
    data = _write(
        tmp_path / "off.csv",
        ["a", "b", "y"],
        [[*r, repr(float(t))] for r, t in zip(x, y, strict=True)],
    )
    res = _train(data, tmp_path / "repo", "regression")
    _refused(
        res,
        f"the target 'y' holds values near {y.max():.10g} with a standard deviation of "
        f"{np.std(y):.3g}: float32, in which the served model computes, holds them only to ±32; "
        "subtract an offset",
        tmp_path / "repo",
    )


def test_the_served_check_is_relative_to_the_targets_spread() -> None:
    # check_served's rtol made its tolerance 1e5 for answers near 1e9: a target of 1e9 + noise
    # served in steps of 64 passed it.
    x = _numbers(1)
    fitted = train_mlp(x, 1e9 + x[:, 0], hidden=(4,), epochs=1, dropout_rates=(0.1,), val_passes=5)
    with pytest.raises(ModelError, match="does not reproduce the fitted model's predictions"):
        check_served(served_module(fitted.final), fitted.final, x)
    near_zero = train_mlp(x, x[:, 0], hidden=(4,), epochs=1, dropout_rates=(0.1,), val_passes=5)
    check_served(served_module(near_zero.final), near_zero.final, x)  # passes


def test_a_date_as_yyyymmdd_is_refused_before_training(tmp_path: Path) -> None:
    # About 2e7 with a spread of a few hundred: trained, then failed as "does not reproduce".
    x = _numbers()
    days = np.random.default_rng(2).integers(1, 29, N)
    months = np.random.default_rng(3).integers(1, 13, N)
    dates = 20230000 + 100 * months + days
    rows = [[r[0], int(d), repr(float(r[1]))] for r, d in zip(x, dates, strict=True)]
    data = _write(tmp_path / "d.csv", ["a", "admitted", "y"], rows)
    res = _train(data, tmp_path / "repo", "regression")
    _refused(
        res,
        f"the column 'admitted' holds values near {dates.max()} with a standard deviation of "
        f"{np.std(dates):.3g}: float32, in which the served model computes, holds them only to ±1",
        tmp_path / "repo",
    )
    assert "subtract an offset (e.g. its minimum) or change its units (a date written as " \
        "YYYYMMDD: convert it to days)" in res.output  # fmt: skip


def test_a_constant_target_is_refused_and_constant_features_are_noted(tmp_path: Path) -> None:
    x = _numbers()
    data = _write(tmp_path / "c.csv", ["a", "b", "y"], [[*r, "7.5"] for r in x])
    _refused(
        _train(data, tmp_path / "repo", "regression"),
        "the target 'y' is 7.5 in every row: a regressor has nothing to learn",
        tmp_path / "repo",
    )
    data = _write(tmp_path / "k.csv", ["a", "k", "y"], [[r[0], 3, r[1]] for r in x])
    table = read_table(data, "y", "regression")
    assert table.notes == [
        "the columns ['k'] hold one value in every row: they tell the model nothing (drop them, "
        "or check the file)"
    ]


def test_an_identifier_column_is_noted_and_ignore_leaves_it_out(tmp_path: Path) -> None:
    """A patient id was trained on without a word, and every new patient's id lies outside its
    training range (the extrapolation trigger refers them all); nothing could leave it out
    (review CSV). Now a note names it, and `--ignore` leaves it out of train, calibrate and
    evaluate of the same file."""
    x = _numbers()
    rows = [[100_000 + i, *r, "ab"[i % 2]] for i, r in enumerate(x)]
    data = _write(tmp_path / "ids.csv", ["patient_id", "a", "b", "y"], rows)
    res = _train(data, tmp_path / "one")
    assert res.exit_code == 0, res.output
    assert (
        "the columns ['patient_id'] hold a different whole number in every row, like an "
        "identifier: if that is what they are, leave them out with --ignore patient_id"
    ) in res.output
    res = _train(data, tmp_path / "two", "classification", "--ignore", "patient_id")
    assert res.exit_code == 0, res.output
    assert "like an identifier" not in res.output
    bundle = Path(res.stdout.strip().splitlines()[-1])
    from service.bundle.load import load_bundle

    m = load_bundle(bundle).manifest
    assert m.inputs.feature_names == ["a", "b"]
    assert m.training.provenance["ignored_columns"] == ["patient_id"]
    runner = CliRunner()
    out = tmp_path / "report"
    ev = runner.invoke(app, ["evaluate", str(bundle), "--data", str(data), "--samples", "5",
                             "--target", "y", "--out", str(out)])  # fmt: skip
    assert ev.exit_code == 0, ev.output
    cal = runner.invoke(app, ["calibrate", str(bundle), "--data", str(data), "--target", "y",
                              "--out", str(tmp_path / "two"), "--samples", "5"])  # fmt: skip
    assert cal.exit_code == 0, cal.output
    # A column that is not there, or the target, is refused before training.
    res = _train(data, tmp_path / "three", "classification", "--ignore", "patient")
    _refused(res, "no --ignore column 'patient'; the columns are", tmp_path / "three")
    res = _train(data, tmp_path / "three", "classification", "--ignore", "patient_id,y")
    _refused(res, "--ignore names the target 'y'", tmp_path / "three")


def test_ignore_is_refused_for_text_data(tmp_path: Path) -> None:
    rows = [[NOTES[i % 2] + f" case {i}", "ab"[i % 2]] for i in range(N)]
    data = _write(tmp_path / "t.csv", ["note", "y"], rows)
    args = ["train", "--data", str(data), "--target", "y", "--task", "classification"]
    res = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "repo"), "--ignore", "note"])
    _refused(res, "--ignore is for tabular data", tmp_path / "repo")
