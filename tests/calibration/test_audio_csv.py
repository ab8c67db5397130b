"""`calibrate` and `evaluate` on an audio model's CSV of WAV file paths: each file read and
featurised as a request's clip is, paths relative to the CSV's folder, and a file that cannot be
read or decoded refused by its row."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from audio_nets import save_audio_model, tone, wav
from typer.testing import CliRunner

from service.bundle.load import load_bundle
from service.calibration.data import read
from service.cli import app
from service.engine.audio import log_mel
from service.engine.wav import read_wav
from service.errors import InvalidInputError

runner = CliRunner()


def _clips(folder: Path, n: int, seed: int) -> list[tuple[str, str]]:
    """n tones written as WAV files under folder/clips; rows (relative path, label)."""
    rng = np.random.default_rng(seed)
    (folder / "clips").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        high = bool(rng.integers(2))
        freq = rng.uniform(1500, 3000) if high else rng.uniform(200, 600)
        name = f"clips/{seed}-{i}.wav"
        (folder / name).write_bytes(wav(tone(freq, rng.uniform(0.2, 0.6))))
        rows.append((name, "high" if high else "low"))
    return rows


def _csv(
    path: Path, rows: list[tuple[str, str]], header: tuple[str, str] = ("audio", "target")
) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("audiorepo")
    save_audio_model(root)
    return root


def test_calibrate_and_evaluate_take_wav_paths(repo: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    cal = _csv(data / "c.csv", _clips(data, 40, 1))  # _clips makes the folder
    res = runner.invoke(
        app,
        [
            "calibrate",
            str(repo / "tones" / "1"),
            "--data",
            str(cal),
            "--out",
            str(repo),
            "--samples",
            "20",
        ],
    )
    assert res.exit_code == 0, res.output
    assert load_bundle(repo / "tones" / "2").manifest.calibration is not None
    test = _csv(data / "t.csv", _clips(data, 30, 2), header=("file", "target"))  # the one other
    out = tmp_path / "report"
    res = runner.invoke(
        app,
        [
            "evaluate",
            str(repo / "tones" / "2"),
            "--data",
            str(test),
            "--out",
            str(out),
            "--samples",
            "20",
        ],
    )
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["rows"] == 30
    assert report["served"]["accuracy"] >= 0.9  # tones of two bands: the model tells them apart


def test_rows_are_the_features_a_request_gets(repo: Path, tmp_path: Path) -> None:
    rows = _clips(tmp_path, 3, 3)
    manifest = load_bundle(repo / "tones" / "1").manifest
    got = read(_csv(tmp_path / "c.csv", rows), manifest)
    audio = manifest.inputs.audio
    assert audio is not None
    for i, (name, _) in enumerate(rows):
        want = log_mel(read_wav((tmp_path / name).read_bytes()).samples, audio)
        assert got.x[i].tobytes() == want.tobytes()
    assert got.y.tolist() == [["low", "high"].index(lab) for _, lab in rows]


def test_a_file_that_cannot_be_read_is_refused_by_its_row(repo: Path, tmp_path: Path) -> None:
    manifest = load_bundle(repo / "tones" / "1").manifest
    rows = _clips(tmp_path, 2, 4)
    missing = _csv(tmp_path / "m.csv", [*rows, ("clips/none.wav", "low")])
    with pytest.raises(InvalidInputError, match=r"row 3 .*column 'audio': cannot read .*none\.wav"):
        read(missing, manifest)
    (tmp_path / "clips" / "bad.wav").write_bytes(b"not audio")
    bad = _csv(tmp_path / "b.csv", [*rows, ("clips/bad.wav", "low")])  # each file in turn
    with pytest.raises(InvalidInputError, match=r"row 3\b.*the audio is not a WAV file"):
        read(bad, manifest)


def test_a_file_over_the_limit_is_refused_by_its_row_unread(repo: Path, tmp_path: Path) -> None:
    """It said only "instance 0: the audio is ... bytes" (no CSV, no row), after reading the
    whole file (a path to /dev/zero never ended)."""
    manifest = load_bundle(repo / "tones" / "1").manifest
    assert manifest.inputs.audio is not None
    limit = manifest.inputs.audio.max_audio_bytes
    rows = _clips(tmp_path, 1, 5)
    with (tmp_path / "clips" / "big.wav").open("wb") as f:
        f.truncate(limit * 100)  # sparse: 600 MB that take no disk
    big = _csv(tmp_path / "b.csv", [*rows, ("clips/big.wav", "low")])
    said = rf"b\.csv: data row 2 .*big\.wav' is over this model's limit of {limit} bytes"
    with pytest.raises(InvalidInputError, match=said):
        read(big, manifest)
    # Not a file: /dev/zero never ended, a FIFO without a writer blocked for ever.
    os.mkfifo(tmp_path / "clips" / "fifo.wav")
    for odd in ("/dev/zero", "clips/fifo.wav"):
        with pytest.raises(InvalidInputError, match=r"data row 1 .* is not a file"):
            read(_csv(tmp_path / "z.csv", [(odd, "low")]), manifest)
    with pytest.raises(InvalidInputError, match=r"data row 2 .*: the path is empty"):
        read(_csv(tmp_path / "e.csv", [*rows, ("  ", "low")]), manifest)
    # An error of the file system while it is checked: said by its row (it was a bare OSError).
    with pytest.raises(InvalidInputError, match=r"data row 1 .*cannot read .*File name too long"):
        read(_csv(tmp_path / "n.csv", [("x" * 300 + ".wav", "low")]), manifest)
    with pytest.raises(InvalidInputError, match=r"data row 1 .*cannot read .*embedded null byte"):
        read(_csv(tmp_path / "u.csv", [("a\0b.wav", "low")]), manifest)  # a ValueError before
