"""`calibrate` and `evaluate` read a CSV as `train` does (service/calibration/csv_file.py) and
its targets alike (targets.py): numbers by value, no missing values, every problem one line."""

from __future__ import annotations

import codecs
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import Result
from nets import mlp
from typer.testing import CliRunner

from service.bundle.load import load_bundle
from service.bundle.manifest import Manifest
from service.calibration import targets
from service.calibration.csv_file import read_csv
from service.calibration.data import read
from service.cli import app
from service.errors import InvalidInputError
from service.packaging import save

runner = CliRunner()
ROWS = [(0.1, -0.1), (0.6, 0.1), (-0.5, 0.3), (1.3, 0.9), (-0.7, -1.2), (0.2, 0.4)]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Classifiers whose labels are numbers, words (one with a newline, one with U+2028) or
    plain words; a regressor."""
    root = tmp_path_factory.mktemp("labelled") / "models"
    torch.manual_seed(0)
    common: dict[str, Any] = {
        "out_dir": root, "version": "1", "intended_use": "tests", "feature_names": ["a", "b"],
    }  # fmt: skip
    for name, labels in (
        ("num", ["1", "2", "3"]),
        ("lines", ["high", "low\nrisk", "mid\u2028risk"]),
        ("words", ["red", "green", "blue"]),
    ):
        x = torch.randn(4, 2)
        save(mlp(0.25, 2, 8, 3), x, name=name, task="classification", labels=labels, **common)
    x = torch.randn(4, 2)
    save(mlp(0.25, 2, 8, 1), x, name="reg", task="regression", target="y", noise_var=0.25, **common)
    return root


def _manifest(repo: Path, name: str) -> Manifest:
    return load_bundle(repo / name / "1").manifest


def _csv(path: Path, targets: list[str], header: str = "a,b,target") -> Path:
    rows = [f"{a},{b},{t}" for (a, b), t in zip(ROWS, targets, strict=False)]
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def _one_line_error(res: Result) -> None:
    """The CLI's answer to a bad file: exit 2, one line, no traceback."""
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1, res.output


def _evaluate_refuses(repo: Path, path: Path, tmp_path: Path) -> None:
    """`evaluate` of the words model on the file at `path`: refused in one line."""
    ev = ["evaluate", str(repo / "words" / "1"), "--data", str(path), "--samples", "5"]
    _one_line_error(runner.invoke(app, [*ev, "--out", str(tmp_path / "report")]))


def test_numeric_labels_match_by_value_never_as_class_positions(repo: Path, tmp_path: Path) -> None:
    # "2.0" and " 2" against labels ['1', '2', '3'] had become class index 2, i.e. '3'.
    m = _manifest(repo, "num")
    data = read(_csv(tmp_path / "n.csv", ["2.0", " 2", "2", "02", "1.0", "3e0"]), m)
    assert data.y.tolist() == [1, 1, 1, 1, 0, 2]
    with pytest.raises(InvalidInputError, match=r"data row 1 \(line 2\): unknown label '0'"):
        read(_csv(tmp_path / "z.csv", ["0"]), m)  # labels are numbers: 0 is no index
    # Labels that are not numbers still take class indices (0-based), as before.
    words = read(_csv(tmp_path / "w.csv", ["2", "1.0", "red", " blue "]), _manifest(repo, "words"))
    assert words.y.tolist() == [2, 1, 0, 2]
    # ... and say so, with the mapping: a file coding its classes otherwise was scored wrong
    # without a word (review CSV); evaluate prints it, and the report keeps it.
    said = (
        "the targets were read as class indices in the model's label order (0 = 'red', "
        "1 = 'green', 2 = 'blue'); if the file numbers its classes otherwise, write the labels"
    )
    assert len(words.notes) == 1 and words.notes[0].startswith(said)
    assert read(_csv(tmp_path / "l.csv", ["red", "blue"]), _manifest(repo, "words")).notes == ()
    # A label in another Unicode form is that label (evaluate said "unknown label 'fièvre'",
    # the model's label printing the same: review R19).
    composed = targets.class_indices(["fie\u0300vre", "fi\u00e8vre"], ["fi\u00e8vre", "x"], str)
    assert composed.tolist() == [0, 0]
    assert data.notes == ()  # numeric labels: matched by value, never as indices
    ev = ["evaluate", str(repo / "words" / "1"), "--data", str(tmp_path / "w.csv")]
    res = runner.invoke(app, [*ev, "--samples", "5", "--out", str(tmp_path / "report")])
    assert res.exit_code == 0, res.output
    assert f"warning: {said}" in res.output
    assert said in (tmp_path / "report" / "report.md").read_text()


@pytest.mark.parametrize("bad", ["nan", "NaN", "inf", "-inf", "1e309", "NA", "", "-", "#DIV/0!"])
def test_missing_classification_targets_are_refused_with_their_row(
    repo: Path, tmp_path: Path, bad: str
) -> None:
    data = _csv(tmp_path / "c.csv", ["1", bad, "2"])
    with pytest.raises(
        InvalidInputError, match=r"data row 2 \(line 3\), the target: .*not a class"
    ):
        read(data, _manifest(repo, "num"))
    with pytest.raises(InvalidInputError, match=r"data row 2 \(line 3\)"):
        read(data, _manifest(repo, "words"))


@pytest.mark.parametrize(
    ("cell", "said"),
    [
        # evaluate said only "'NA' is not a number" (train: fill it in), and took "1_0" for 10.
        ("NA", "'NA' marks a missing value; fill it in or drop the row"),
        ("-", "'-' marks a missing value; fill it in or drop the row"),
        ("1_0", "'1_0' is not a number; the model's features are numbers: correct it or drop"),
    ],
)
def test_features_are_read_as_train_reads_them(
    repo: Path, tmp_path: Path, cell: str, said: str
) -> None:
    path = _csv(tmp_path / "f.csv", ["red", "blue"])
    path.write_text(path.read_text().replace("0.6,0.1", f"0.6,{cell}"))
    with pytest.raises(InvalidInputError, match=r"data row 2 \(line 3\), column 'b': ") as err:
        read(path, _manifest(repo, "words"))
    assert said in err.value.message


@pytest.mark.parametrize("bad", ["nan", "inf", "-Infinity", "1e309", "4e38", ""])
def test_non_finite_regression_targets_are_refused_by_calibrate_and_evaluate(
    repo: Path, tmp_path: Path, bad: str
) -> None:
    data = _csv(tmp_path / "r.csv", ["0.5", "0.1", bad, "1.0", "0.2", "0.3"], "a,b,y")
    with pytest.raises(InvalidInputError, match=r"data row 3 \(line 4\), target 'y'"):
        read(data, _manifest(repo, "reg"))
    cal = ["calibrate", str(repo / "reg" / "1"), "--data", str(data), "--samples", "5"]
    _one_line_error(runner.invoke(app, [*cal, "--out", str(tmp_path / "out")]))
    assert not (tmp_path / "out").exists()
    ev = ["evaluate", str(repo / "reg" / "1"), "--data", str(data), "--samples", "5"]
    _one_line_error(runner.invoke(app, [*ev, "--out", str(tmp_path / "report")]))
    cls = _csv(tmp_path / "c.csv", ["1", bad or "nan", "2"])
    ev = ["evaluate", str(repo / "num" / "1"), "--data", str(cls), "--samples", "5"]
    _one_line_error(runner.invoke(app, [*ev, "--out", str(tmp_path / "report")]))


def test_files_are_decoded_as_train_decodes_them(repo: Path, tmp_path: Path) -> None:
    m = _manifest(repo, "words")
    text = "a,b,target\n0.1,0.2,red\n0.3,0.4,blue\n"
    bom = tmp_path / "bom.csv"
    bom.write_bytes(codecs.BOM_UTF8 + text.encode())  # a spreadsheet's "CSV UTF-8"
    assert read(bom, m).y.tolist() == [0, 2]
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes(text.replace("red", "rouge é").encode("latin-1"))
    with pytest.raises(InvalidInputError, match=r"line 2 is not UTF-8 .* save the file as UTF-8"):
        read(latin1, m)
    utf16 = tmp_path / "utf16.csv"
    utf16.write_bytes(text.encode("utf-16"))
    with pytest.raises(InvalidInputError, match=r"UTF-16 .* save it as UTF-8"):
        read(utf16, m)
    ev = ["evaluate", str(repo / "words" / "1"), "--data", str(latin1), "--samples", "5"]
    _one_line_error(runner.invoke(app, [*ev, "--out", str(tmp_path / "report")]))


@pytest.mark.parametrize(
    ("text", "said"),
    [
        (
            "a,b,target\n0.1,0.2,red\n0.3,blue\n",
            r"data row 2 \(line 3\) has 2 fields, the header 3",
        ),
        ("a,b,target\n0.1,0.2,red,9\n", r"data row 1 \(line 2\) has 4 fields, the header 3"),
        ("a,b,a,target\n0.1,0.2,9,red\n", r"repeats the column name\(s\) \['a'\]"),
        ("a,,target\n0.1,0.2,red\n", r"header column\(s\) \[2\] have no name"),
    ],
)
def test_ragged_rows_and_repeated_columns_are_refused(
    repo: Path, tmp_path: Path, text: str, said: str
) -> None:
    # A short row was an IndexError traceback, a long one and a repeated column silently read.
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(InvalidInputError, match=said):
        read(path, _manifest(repo, "words"))
    _evaluate_refuses(repo, path, tmp_path)


def test_quoted_newlines_and_line_separators_stay_in_their_field(
    repo: Path, tmp_path: Path
) -> None:
    # str.splitlines() outside the parser made "low\nrisk" "lowrisk" and split at U+2028.
    path = tmp_path / "q.csv"
    path.write_text('a,b,target\n0.1,0.2,"low\nrisk"\n0.3,0.4,mid\u2028risk\n0.5,0.6,high\n')
    data = read(path, _manifest(repo, "lines"))
    assert data.y.tolist() == [1, 2, 0]
    assert read_csv(path).lines == [2, 4, 5]  # each data row's first line


def test_long_fields_are_read_and_an_endless_one_is_one_line(repo: Path, tmp_path: Path) -> None:
    # csv's default limit (131,072 characters) was a `_csv.Error` traceback.
    long = tmp_path / "long.csv"
    long.write_text("a,b,target\n0." + "0" * 140_000 + "1,0.2,red\n")
    assert read(long, _manifest(repo, "words")).y.tolist() == [0]
    endless = tmp_path / "endless.csv"
    endless.write_text('a,b,target\n0.1,0.2,"red\n' + "x" * (1 << 20) + "\n")
    with pytest.raises(InvalidInputError, match="row starting at line 2 has a field over"):
        read_csv(endless)
    _evaluate_refuses(repo, endless, tmp_path)


@pytest.mark.parametrize(
    ("text", "said"),
    [
        # A quote opened and never closed: the rows after it were one label (a bogus class of
        # one row) or, at the end of the file, silently gone; `train` exited 0 (review CSV).
        (
            'a,b,target\n0.1,0.2,"red\n0.3,0.4,blue\n0.5,0.6,"green"\n0.7,0.8,red\n',
            "row starting at line 2 runs on to line 4.*a quote opened at line 2 is probably not",
        ),
        (
            'a,b,target\n0.1,0.2,red\n0.3,0.4,"blue\n0.5,0.6,green\n',
            r"row starting at line 3 runs on to line 4.*\(unexpected end of data\)",
        ),
        # Text after a closing quote, on one line: not half a field.
        ('a,b,target\n0.1,0.2,"re"d\n', "line 2 is not valid CSV.*quote written twice"),
    ],
)
def test_an_unclosed_quote_is_refused_not_swallowing_rows(
    repo: Path, tmp_path: Path, text: str, said: str
) -> None:
    path = tmp_path / "quote.csv"
    path.write_text(text)
    with pytest.raises(InvalidInputError, match=said):
        read_csv(path)
    _evaluate_refuses(repo, path, tmp_path)
    # Rows of empty fields ending the file (a spreadsheet's ",,,") are dropped like blank lines
    # (they were refused as missing values); one inside the data is kept, and refused.
    path.write_text("a,b,target\n0.1,0.2,red\n,,\n0.3,0.4,blue\n,,\r\n , ,\n\n")
    assert read_csv(path).column("target") == ["red", "", "blue"]
    # A quoted field over lines, or with a doubled quote, is still one field.
    path.write_text('a,b,target\n0.1,0.2,"red"\n0.3,"0.4",blue\n0.5,0.6,"gr""een"\n')
    assert read_csv(path).column("target") == ["red", "blue", 'gr"een']


def test_request_checks_name_the_data_row(repo: Path, tmp_path: Path) -> None:
    path = _csv(tmp_path / "f.csv", ["red", "blue"])
    path.write_text(path.read_text().replace("0.6,0.1", "0.6,nan"))
    # Read as train reads it (targets.read_number), before the request's checks: the same words.
    said = r"data row 2 \(line 3\), column 'b': 'nan' is not a finite number; fill the value in"
    with pytest.raises(InvalidInputError, match=said):
        read(path, _manifest(repo, "words"))


class _Frames(torch.nn.Module):
    """Audio features [B, 4 mels, 6 frames], packaged without feature names as docs show."""

    def __init__(self) -> None:
        super().__init__()
        self.drop, self.fc = torch.nn.Dropout(0.2), torch.nn.Linear(24, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(x.flatten(1)))


def test_a_model_without_feature_names_is_told_how_to_get_a_csv_read(tmp_path: Path) -> None:
    """It said only "the manifest has no feature names, so a CSV cannot be matched"."""
    torch.manual_seed(0)
    path = save(
        _Frames().eval(), torch.randn(4, 4, 6), out_dir=tmp_path, name="kws", version="1",
        task="classification", intended_use="t", labels=["yes", "no"],
    )  # fmt: skip
    data = tmp_path / "cal.csv"
    data.write_text("x0,label\n0.1,yes\n")
    with pytest.raises(InvalidInputError) as e:
        read(data, load_bundle(path).manifest)
    assert "cannot be matched to its 24 input values; package it again with feature_names" in (
        e.value.message
    )
    assert 'feature_names=[f"x{i}" for i in range(24)]' in e.value.message
