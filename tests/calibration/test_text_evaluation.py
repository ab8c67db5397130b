"""`calibrate` and `evaluate` on text CSVs, and the multi-label (lenient) reading of accuracy."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from service.calibration import metrics
from service.cli import app
from service.packaging import save
from tests.text_nets import CORPUS, TextCNN, token_batch, wordpiece

runner = CliRunner()


def test_lenient_accuracy_and_macro_f1_by_hand() -> None:
    # Rows 0 and 1 are the same text, labelled 0 and 1; rows 2 and 3 are texts of their own.
    y = np.array([0, 1, 2, 1])
    groups = np.array([0, 0, 1, 2])
    pred = np.array([1, 1, 0, 1])
    # Strict: rows 1 and 3 right. Class 0: tp 0, fp 1, fn 1 -> 0; class 1: tp 2, fp 1 -> 0.8;
    # class 2: fn 1 -> 0. Macro-F1 0.8 / 3.
    assert float(np.mean(pred == y)) == 0.5
    assert metrics.macro_f1(pred, y, 3) == pytest.approx(0.8 / 3)
    # Lenient: row 0's prediction 1 is a label of its text, so it is right; targets [1, 1, 2, 1].
    lenient = metrics.lenient_targets(pred, y, groups)
    assert lenient.tolist() == [1, 1, 2, 1]
    assert float(np.mean(pred == lenient)) == 0.75
    # Class 0: fp 1 -> 0; class 1: tp 3 -> 1; class 2: fn 1 -> 0.
    assert metrics.macro_f1(pred, lenient, 3) == pytest.approx(1 / 3)


def _write(path: Path, rows: list[tuple[str, str]]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "target"])
        w.writerows(rows)
    return path


def test_calibrate_and_evaluate_take_text_csvs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    repo = tmp_path / "repo"
    net = TextCNN().eval()
    with torch.no_grad():  # a head that says "a" whatever the masks: the hand case below holds
        net.fc.weight.mul_(0.01)
        net.fc.bias.copy_(torch.tensor([8.0, 0.0, -8.0]))
    save(
        net, token_batch(), out_dir=repo, name="notes", version="1",
        task="classification", intended_use="tests", labels=["a", "b", "c"],
        tokenizer=wordpiece(CORPUS),
    )  # fmt: skip
    rng = np.random.default_rng(0)
    texts = sorted(set(CORPUS))
    # Quoted commas and a newline inside a text must survive the CSV round trip.
    texts.append('chest pain, "atypical"\nwith nausea')
    cal = [(texts[i % len(texts)], "abc"[int(rng.integers(3))]) for i in range(40)]
    cal_csv = _write(tmp_path / "c.csv", cal)
    res = runner.invoke(
        app, ["calibrate", str(repo / "notes" / "1"), "--data", str(cal_csv), "--out", str(repo)]
    )
    assert res.exit_code == 0, res.output
    # The test file: every text twice, once as "a" and once as "b".
    rows = [(t, lab) for t in texts for lab in ("a", "b")]
    out = tmp_path / "report"
    res = runner.invoke(
        app,
        ["evaluate", str(repo / "notes" / "2"), "--data", str(_write(tmp_path / "t.csv", rows)),
         "--out", str(out), "--samples", "20"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    n = json.loads((out / "report.json").read_text())
    assert n["data"]["rows"] == 2 * len(texts)
    le = n["lenient"]
    assert le["texts"] == len(texts) and le["rows_of_multi_label_texts"] == 2 * len(texts)
    # Each text's two rows: a prediction of "a" or "b" is right on both read leniently, on one
    # strictly; a prediction of "c" is wrong on both either way.
    strict = n["served"]["accuracy"]
    assert strict == pytest.approx(0.5) and le["accuracy"] == pytest.approx(1.0)
    assert "variation_ratio" in n["error_detection_auroc"]
    assert "macro-F1" in (out / "report.md").read_text()
