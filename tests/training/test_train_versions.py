"""The versions `train` (and `save`) write: checked before training, whole or not at all
(service/training/versions.py, service/packaging/destination.py)."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import Result
from nets import mlp
from typer.testing import CliRunner

from service.cli import app
from service.errors import BundleError, InvalidInputError
from service.packaging import save
from service.training import versions
from service.training.table import split

runner = CliRunner()
SEED = 3


def _csv(path: Path, labels: list[str]) -> Path:
    x = np.random.default_rng(0).uniform(-1, 1, size=(len(labels), 2)).round(4)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["a", "b", "y"])
        w.writerows([*map(float, row), y] for row, y in zip(x, labels, strict=True))
    return path


def _train(data: Path, out: Path, *extra: str) -> Result:
    args = ["train", "--data", str(data), "--target", "y", "--task", "classification"]
    return runner.invoke(
        app, [*args, "--out", str(out), "--hidden", "8", "--epochs", "2", "--seed", str(SEED),
              *extra],
    )  # fmt: skip


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_what_the_calibration_method_needs_is_checked_before_training(tmp_path: Path) -> None:
    # `vector` on 10 rows (2 calibration rows) trained, then failed naming `--method`, and left
    # a ready, uncalibrated version 1 that blocked the rerun.
    few = _csv(tmp_path / "few.csv", [["1", "2", "3"][i % 3] for i in range(10)])
    for method in ("vector", "auto"):
        res = _train(few, tmp_path / "repo", "--calibration-method", method)
        assert res.exit_code == 2 and "Traceback" not in res.output, res.output
        assert "needs at least 10 calibration rows" in res.output
        assert "use --calibration-method temperature" in res.output
    # A class without calibration rows cannot be vector-scaled: said before training.
    n = 60
    _, cal = split(n, SEED)
    labels = [["a", "b"][i % 2] for i in range(n)]
    for i in sorted(set(range(n)) - set(cal.tolist()))[:5]:
        labels[i] = "rare"
    res = _train(_csv(tmp_path / "rare.csv", labels), tmp_path / "repo", "--calibration-method",
                 "vector")  # fmt: skip
    assert res.exit_code == 2, res.output
    assert "the classes ['rare'] have none" in res.output
    assert "use --calibration-method temperature" in res.output
    assert not (tmp_path / "repo").exists()


def test_a_failed_calibration_leaves_neither_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _csv(tmp_path / "visits.csv", [["low", "high"][i % 2] for i in range(30)])
    repo = tmp_path / "repo"

    def fail(source: Path, *args: Any, **kwargs: Any) -> None:
        # Version 1 is complete but staged out of the registry's sight while it is calibrated.
        assert (source / "manifest.json").is_file() and not (repo / "visits" / "1").exists()
        assert source.parent.parent.name.startswith(".train-")
        raise InvalidInputError("something only calibration finds")

    handlers = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)]
    monkeypatch.setattr(versions, "calibrate_bundle", fail)
    res = _train(data, repo)
    assert res.exit_code == 2, res.output
    assert "no version of 'visits' was written (neither 1 nor 2): something only calibration " \
        "finds" in res.output  # fmt: skip
    # No uncalibrated version for `models` to list, no staging directory, nothing this made.
    assert not repo.exists()
    assert [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)] == handlers  # restored
    monkeypatch.undo()
    res = _train(data, repo)  # the rerun is not blocked by "already exists"
    assert res.exit_code == 0, res.output
    assert _files(repo / "visits")[:2] == ["1", "1/architecture.json"]
    assert sorted(p.name for p in (repo / "visits").iterdir()) == ["1", "2"]


# Run in a child: SIGTERM at a fixed point of `train` (`signal.raise_signal`, no timing).
CHILD = """
import signal, sys
from service.training import versions
from service.packaging import destination

stop_in = sys.argv.pop(1)
calibrate, refuse = versions.calibrate_bundle, destination.refuse_existing

def calibrating(*args, **kwargs):
    signal.raise_signal(signal.SIGTERM)  # as a service manager's stop, mid-calibration
    return calibrate(*args, **kwargs)

def hanging_up(*args, **kwargs):
    signal.raise_signal(signal.SIGHUP)  # the terminal closes; nohup ignores it
    return calibrate(*args, **kwargs)

def placing(dest):
    if dest.name == "2" and ".train-" not in str(dest):  # between the two renames
        signal.raise_signal(signal.SIGTERM)
    return refuse(dest)

if stop_in == "calibration":
    versions.calibrate_bundle = calibrating
elif stop_in == "nohup":
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    versions.calibrate_bundle = hanging_up
else:
    destination.refuse_existing = placing
from service.cli import app
app(sys.argv[1:], prog_name="service")
"""


@pytest.mark.parametrize(
    ("stop_in", "code", "left"),
    [("calibration", 143, []), ("placing", 143, []), ("nohup", 0, ["1", "2"])],
)
def test_sigterm_leaves_no_uncalibrated_version(
    tmp_path: Path, stop_in: str, code: int, left: list[str]
) -> None:
    # A SIGTERM while version 1 was being calibrated ended the process at once: version 1 stayed,
    # served uncalibrated, and the rerun was refused with "already exists".
    data = _csv(tmp_path / "visits.csv", [["low", "high"][i % 2] for i in range(30)])
    repo = tmp_path / "repo"
    args = ["train", "--data", str(data), "--target", "y", "--task", "classification", "--out",
            str(repo), "--hidden", "8", "--epochs", "2", "--seed", str(SEED)]  # fmt: skip
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, stop_in, *args], cwd=root, env=env, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == code, proc.stderr  # 143: not killed, cleaned up
    assert ("error: stopped by SIGTERM" in proc.stderr) == (code == 143)
    assert "Traceback" not in proc.stderr
    # Stopped mid-calibration, or between the renames (the signal waits for the second, then
    # both are taken back: "stopped" leaves nothing): nothing. A SIGHUP that nohup ignores
    # stays ignored (it ended the run).
    found = sorted(p.name for p in (repo / "visits").iterdir()) if repo.exists() else []
    assert found == left, _files(tmp_path)


@pytest.mark.parametrize("flag", ["--version", "--name"])
@pytest.mark.parametrize("bad", ["../escape", "v 1", ".hidden", "a/b", ""])
def test_an_invalid_version_or_name_is_refused_before_training(
    tmp_path: Path, flag: str, bad: str
) -> None:
    # "../escape" trained, then failed with a pydantic traceback, leaving files outside
    # <out>/<name>/; "v 1" and ".hidden" left manifest-less directories that blocked reruns.
    data = _csv(tmp_path / "cls.csv", ["x", "y"] * 6)
    res = _train(data, tmp_path / "out" / "repo", flag, bad)
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert f"error: {flag} {bad!r}: use 1-64" in res.output
    assert _files(tmp_path) == ["cls.csv"]


@pytest.mark.parametrize("out", ["afile", "afile/repo", "repo/cls"])
def test_an_out_that_cannot_hold_the_model_is_refused_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, out: str
) -> None:
    # A file on the way was found after the whole training: "[Errno 20] Not a directory".
    data = _csv(tmp_path / "cls.csv", ["x", "y"] * 6)
    (tmp_path / "afile").write_text("mine")
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "cls").write_text("mine")  # <out>/<name> a file

    def train_mlp(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("trained before --out was checked")

    monkeypatch.setattr("service.training.table_cli.train_mlp", train_mlp)
    res = _train(data, tmp_path / out)
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    blocker = tmp_path / ("repo/cls" if out == "repo/cls" else "afile")
    assert f"error: --out {tmp_path / out}: {blocker} is not a directory, so " in res.output
    assert "give a directory, or a path that does not exist yet, as --out" in res.output
    assert _files(tmp_path) == ["afile", "cls.csv", "repo", "repo/cls"]
    assert blocker.read_text() == "mine"


def test_save_writes_a_whole_version_or_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "models"

    def put(version: str, name: str = "m") -> Path:
        torch.manual_seed(0)
        return save(
            mlp(0.25, 2, 8, 2), torch.randn(4, 2), out_dir=out, name=name, version=version,
            task="classification", labels=["a", "b"], intended_use="tests",
        )  # fmt: skip

    for bad in ("../escape", "v 1", ".hidden"):
        with pytest.raises(BundleError, match=f"version {bad!r}: use"):
            put(bad)
    with pytest.raises(BundleError, match="name 'M': use"):
        put("1", name="M")
    assert not tmp_path.joinpath("escape").exists() and not out.exists()

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("export failed")

    monkeypatch.setattr("service.packaging.writer.export_onnx", broken)
    with pytest.raises(RuntimeError, match="export failed"):
        put("1")
    assert not out.exists()  # no half-written version, no hidden staging directory
    monkeypatch.undo()
    assert put("1") == out / "m" / "1"
    assert [p.name for p in out.iterdir()] == ["m"]  # the staging directory is gone
    assert sorted(p.name for p in (out / "m" / "1").iterdir()) == [
        "architecture.json", "manifest.json", "model.onnx", "weights.safetensors",
    ]  # fmt: skip
    with pytest.raises(BundleError, match="already exists"):
        put("1")
    assert sorted(p.name for p in (out / "m").iterdir()) == ["1"]  # no staging left
    assert (out / "m" / "1").stat().st_mode & 0o777 == 0o777 & ~_umask()  # the user's umask


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_model_directory_on_another_filesystem_is_written(tmp_path: Path) -> None:
    """The staging directory sat in <out>, and the rename into <out>/<name> failed with EXDEV
    when that is a mount or a link to another filesystem (/dev/shm here), after the training."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.fail("this test needs /dev/shm on a filesystem of its own (tmpfs)")
    elsewhere = Path(tempfile.mkdtemp(dir=shm))
    try:
        out = tmp_path / "models"
        out.mkdir()
        (out / "m").symlink_to(elsewhere)
        torch.manual_seed(0)
        path = save(
            mlp(0.25, 2, 8, 2), torch.randn(4, 2), out_dir=out, name="m", version="1",
            task="classification", labels=["a", "b"], intended_use="tests",
        )  # fmt: skip
        assert (elsewhere / "1" / "manifest.json").is_file() and path == out / "m" / "1"
    finally:
        shutil.rmtree(elsewhere)
