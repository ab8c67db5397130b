"""`train`'s flags (service/training/options.py): a flag for the other kind of data, `--labels`
with a comma inside a label, 1-based `--splits`, and a class the split left without training
rows; all refused before training, saying what to do."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from click.testing import Result
from typer.testing import CliRunner

from service.cli import app
from service.errors import InvalidInputError
from service.training.table import split
from service.training.text_data import read_splits

runner = CliRunner()
N = 40
TEXTS = [
    "the coronary artery and the heart were examined after the infarction",
    "the seizure started in the cortex and spread through the brain quickly",
]


def _tabular(path: Path, labels: list[str]) -> Path:
    x = np.random.default_rng(0).uniform(-1, 1, size=(len(labels), 2)).round(4)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["a", "b", "y"])
        w.writerows([*map(float, r), y] for r, y in zip(x, labels, strict=True))
    return path


def _text(path: Path) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "y"])
        w.writerows([f"{TEXTS[i % 2]}, case {i}", "ab"[i % 2]] for i in range(N))
    return path


def _train(data: Path, out: Path, *extra: str) -> Result:
    args = ["train", "--data", str(data), "--target", "y", "--task", "classification"]
    return runner.invoke(app, [*args, "--out", str(out), "--epochs", "2", "--seed", "3", *extra])


def _refused(res: Result, said: str, out: Path) -> None:
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and said in res.output, res.output
    assert not out.exists()  # refused before anything was written


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        (["--arch", "bilstm"], "--arch is for text data"),
        (["--max-tokens", "64", "--word-min-texts", "0"], "--max-tokens, --word-min-texts are"),
        (["--word-vectors", "glove.txt"], "--word-vectors is for text data"),
        # At their default values too: the user still believed a text model was trained.
        (["--arch", "textcnn", "--max-tokens", "256"], "--arch, --max-tokens are for text"),
        (["--word-min-texts", "2"], "--word-min-texts is for text data"),
    ],
)
def test_a_text_flag_on_tabular_data_is_refused(
    tmp_path: Path, extra: list[str], said: str
) -> None:
    # They were ignored without a word: the user believed a BiLSTM, 64 tokens, ... was trained.
    data = _tabular(tmp_path / "t.csv", ["a", "b"] * (N // 2))
    res = _train(data, tmp_path / "repo", *extra)
    _refused(res, said, tmp_path / "repo")
    assert "trains a tabular model (no column of free text: name one with --text-column)" in (
        res.output
    )


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        (["--hidden", "8"], "--hidden is"),
        (["--hidden", "64,64", "--noise", "fixed"], "--hidden, --noise are"),
    ],
)
def test_a_tabular_flag_on_text_data_is_refused(
    tmp_path: Path, extra: list[str], said: str
) -> None:
    res = _train(_text(tmp_path / "notes.csv"), tmp_path / "repo", *extra)
    _refused(
        res,
        f"{said} for tabular data, and "
        f"{tmp_path / 'notes.csv'} trains a text model on the column 'text'; leave it out",
        tmp_path / "repo",
    )


def test_labels_may_hold_a_comma_when_quoted(tmp_path: Path) -> None:
    # --labels '"yes, severe",no' was split at every comma: '"yes', 'severe"' and 'no'.
    data = _tabular(tmp_path / "c.csv", ["yes, severe", "no", "maybe"] * 13 + ["no"])
    res = _train(data, tmp_path / "repo", "--labels", '"yes, severe", no')
    _refused(
        res,
        "the target 'y' has labels ['maybe'] that --labels ['yes, severe', 'no'] does not list",
        tmp_path / "repo",
    )
    res = _train(data, tmp_path / "repo", "--labels", '"yes, severe,no')
    _refused(res, "quote a label that holds a comma", tmp_path / "repo")


def test_a_class_whose_rows_all_fell_into_calibration_says_how_many_it_has(
    tmp_path: Path,
) -> None:
    _, cal = split(N, 3)
    labels = ["a", "b"] * (N // 2)
    labels[int(cal[0])] = "rare"
    res = _train(_tabular(tmp_path / "r.csv", labels), tmp_path / "repo")
    _refused(
        res,
        "the classes ['rare'] have no training rows: 'rare' has 1 row, and the seeded 80/20 cut "
        "put them among the calibration rows; add rows of these classes, or try another --seed",
        tmp_path / "repo",
    )


@pytest.mark.parametrize("kind", ["tabular", "text"])
def test_labels_naming_a_class_no_row_has_says_so(tmp_path: Path, kind: str) -> None:
    # It was told "the seeded 80/20 cut put them among the calibration rows; ... or try another
    # --seed", which no seed could help.
    data = (
        _text(tmp_path / "n.csv")
        if kind == "text"
        else _tabular(tmp_path / "t.csv", ["a", "b"] * 20)
    )
    res = _train(data, tmp_path / "repo", "--labels", "a,b,maybe")
    _refused(
        res,
        f"{data}: --labels lists 'maybe', which no row of the data has (a class needs training "
        "rows); drop it from --labels, or add rows of that class to the data",
        tmp_path / "repo",
    )
    assert "--seed" not in res.output


@pytest.mark.parametrize("seed", [-1, 2**63, 2**64])
@pytest.mark.parametrize("kind", ["tabular", "text"])
def test_a_seed_out_of_range_is_refused_before_training(
    tmp_path: Path, seed: int, kind: str
) -> None:
    # numpy refused -1 and 2**64 with a traceback; 2**63 trained, then failed at calibration.
    data = _text(tmp_path / "n.csv") if kind == "text" else _tabular(tmp_path / "t.csv", ["a", "b"])
    args = ["train", "--data", str(data), "--target", "y", "--task", "classification"]
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "repo"), "--seed", str(seed)])
    _refused(res, f"error: --seed {seed}: use 0..2**63 - 1", tmp_path / "repo")


def test_splits_counted_from_one_are_told_rows_are_0_based(tmp_path: Path) -> None:
    one_based = tmp_path / "s.csv"
    one_based.write_text("row,split\n" + "".join(f"{i + 1},train\n" for i in range(N)))
    with pytest.raises(InvalidInputError, match="rows are 0-based: the first data row, after"):
        read_splits(one_based, N)
