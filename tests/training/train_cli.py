"""`python -m service train` through typer's runner, small and seeded, for the CSV tests."""

from __future__ import annotations

from pathlib import Path

from click.testing import Result
from typer.testing import CliRunner

from service.cli import app

runner = CliRunner()


def train(data: Path, out: Path, task: str = "classification", *extra: str) -> Result:
    args = ["train", "--data", str(data), "--target", "y", "--task", task, "--out", str(out)]
    return runner.invoke(app, [*args, "--hidden", "8", "--epochs", "2", "--seed", "3", *extra])


def refused(res: Result, said: str, out: Path) -> None:
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and said in res.output, res.output
    assert not out.exists()  # refused before anything was written
