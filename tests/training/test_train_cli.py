"""`python -m service train`: CSV -> trained, bundled, calibrated model that the service serves."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Literal

import httpx
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from service.api.app import create_app
from service.bundle.load import load_bundle
from service.cli import app
from service.settings import Settings
from service.training import train_mlp
from service.training.served import fitted_deterministic, served_module

runner = CliRunner()
N = 300


def _features(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, size=(N, 3)) * np.array([1.0, 10.0, 0.1]) + np.array([0, 100, 0])


def _write(path: Path, header: list[str], x: np.ndarray, y: list[str]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for row, t in zip(x, y, strict=True):
            w.writerow([*(repr(float(v)) for v in row), t])
    return path


def _regression_csv(path: Path) -> Path:
    x = _features(0)
    y = 50 + 10 * (2 * x[:, 0] - 0.1 * x[:, 1]) + np.random.default_rng(1).normal(size=N)
    return _write(path, ["a", "b", "c", "progress"], x, [repr(float(v)) for v in y])


def _classification_csv(path: Path) -> Path:
    x = _features(2)
    labels = np.where(x[:, 0] > 0.3, "high", np.where(x[:, 0] < -0.3, "low", "mid"))
    return _write(path, ["a", "b", "c", "grade"], x, [str(v) for v in labels])


def _train(data: Path, target: str, task: str, out: Path, *extra: str) -> Path:
    args = ["train", "--data", str(data), "--target", target, "--task", task, "--out", str(out)]
    res = runner.invoke(app, [*args, "--hidden", "16", "--epochs", "15", "--seed", "3", *extra])
    assert res.exit_code == 0, res.output
    path = Path(res.stdout.strip().splitlines()[-1])
    assert path == out / data.stem.lower() / "2"
    return path


async def _predict(repo: Path, name: str, instance: dict[str, float]) -> dict[str, Any]:
    application = create_app(Settings(model_dir=repo))
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            r = await client.post(
                f"/v1/models/{name}:predict",
                json={"instances": [instance], "parameters": {"seed": 1}},
            )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"]["version"] == "2"  # the calibrated version is the newest
    pred: dict[str, Any] = body["predictions"][0]
    return pred


async def test_regression_end_to_end(tmp_path: Path) -> None:
    data = _regression_csv(tmp_path / "Blood.csv")
    bundle = _train(data, "progress", "regression", tmp_path / "repo")
    m = load_bundle(bundle).manifest
    assert m.inputs.feature_names == ["a", "b", "c"] and m.outputs.target == "progress"
    assert m.aleatoric.noise_var and m.aleatoric.noise_var > 0
    assert m.calibration is not None and m.calibration.n == 60
    assert m.defaults.interval == "conformal"
    assert {"calibration_rmse", "calibration_ll"} <= set(m.training.metrics)
    assert len(m.training.row_fingerprints["train"]) == 240
    assert m.inputs.training_ranges and m.inputs.valid_ranges
    (lo, hi), (vlo, vhi) = m.inputs.training_ranges[1], m.inputs.valid_ranges[1]
    assert 89 < lo < hi < 111 and vlo == pytest.approx(lo - 10 * (hi - lo))
    assert vhi == pytest.approx(hi + 10 * (hi - lo))
    assert "python -m service train" in m.intended_use
    pred = await _predict(tmp_path / "repo", "blood", {"a": 0.2, "b": 101.0, "c": 0.0})
    interval = pred["intervals"][0]
    assert interval["method"] == "conformal"
    assert isinstance(pred["referral"]["refer"], bool)


async def test_classification_end_to_end(tmp_path: Path) -> None:
    data = _classification_csv(tmp_path / "grades.csv")
    bundle = _train(
        data, "grade", "classification", tmp_path / "repo", "--calibration-method", "auto"
    )
    m = load_bundle(bundle).manifest
    assert m.outputs.labels == ["high", "low", "mid"]
    assert m.calibration is not None and m.calibration.temperature is not None
    # --calibration-method reaches the calibrate step: both methods cross-validated, one chosen.
    assert m.calibration.fit["requested"] == "auto"
    assert m.calibration.fit["method"] in ("temperature", "vector")
    assert {"calibration_accuracy", "calibration_nll"} <= set(m.training.metrics)
    pred = await _predict(tmp_path / "repo", "grades", {"a": 0.9, "b": 100.0, "c": 0.0})
    assert set(pred["probabilities"]) == {"high", "low", "mid"}
    assert pred["prediction_set"]["level"] == 0.95
    assert isinstance(pred["referral"]["refer"], bool)


@pytest.mark.parametrize("task", ["regression", "classification"])
def test_served_module_matches_fitted_model(task: Literal["regression", "classification"]) -> None:
    x = _features(4)[:120]
    y = (x[:, 0] > 0).astype(np.int64) if task == "classification" else 30 + 5 * x[:, 0]
    fitted = train_mlp(x, y, hidden=(8,), epochs=3, task=task, val_passes=10).final
    module = served_module(fitted)
    with torch.inference_mode():
        got = module(torch.as_tensor(x, dtype=torch.float32)).double().numpy()
    want = fitted_deterministic(fitted, x)
    scale = float(fitted.y_std[0]) if fitted.y_std is not None else 1.0
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale)


def test_bad_csv_is_a_clear_error(tmp_path: Path) -> None:
    good = _regression_csv(tmp_path / "good.csv")
    base = ["train", "--task", "regression", "--out", str(tmp_path / "repo")]
    res = runner.invoke(
        app, [*base, "--data", str(good), "--target", "progress", "--calibration-method", "vector"]
    )
    assert res.exit_code == 2 and "vector and auto are for --task classification" in res.output
    res = runner.invoke(app, [*base, "--data", str(good), "--target", "nope"])
    assert res.exit_code == 2
    assert "no target column 'nope'" in res.output
    lines = good.read_text().splitlines()
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join([lines[0], "x," + lines[1].split(",", 1)[1], *lines[2:]]) + "\n")
    res = runner.invoke(app, [*base, "--data", str(bad), "--target", "progress"])
    assert res.exit_code == 2
    assert "column 'a': 'x' is not a number" in res.output
    assert not (tmp_path / "repo").exists()


def _labelled_csv(path: Path, names: list[str]) -> Path:
    """Class k (0-based, in `names`' order) where feature a falls in the k-th equal slice."""
    x = _features(5)
    k = np.minimum(((x[:, 0] + 1) / 2 * len(names)).astype(int), len(names) - 1)
    return _write(path, ["a", "b", "c", "y"], x, [names[int(i)] for i in k])


def _train_labels(data: Path, out: Path, *extra: str) -> Any:
    args = ["train", "--data", str(data), "--target", "y", "--task", "classification"]
    return runner.invoke(
        app, [*args, "--out", str(out), "--hidden", "8", "--epochs", "2", "--seed", "3", *extra]
    )


def test_numeric_labels_are_ordered_by_value(tmp_path: Path) -> None:
    numbers = [str(k) for k in range(1, 13)]
    res = _train_labels(_labelled_csv(tmp_path / "months.csv", numbers), tmp_path / "repo")
    assert res.exit_code == 0, res.output
    m = load_bundle(Path(res.stdout.strip().splitlines()[-1])).manifest
    assert m.outputs.labels == numbers  # not '1', '10', '11', '12', '2', ...
    assert f"classes in output order: {numbers}" in res.stderr


async def test_labels_flag_sets_the_order(tmp_path: Path) -> None:
    words = ["low", "medium", "high"]
    data = _labelled_csv(tmp_path / "grades.csv", words)
    res = _train_labels(data, tmp_path / "plain")
    assert res.exit_code == 0, res.output
    # Without --labels, words are sorted as text, and the output says so and how to change it.
    assert "classes in output order: ['high', 'low', 'medium'] (set it with --labels)" in (
        res.stderr
    )
    res = _train_labels(data, tmp_path / "repo", "--labels", "low,medium,high")
    assert res.exit_code == 0, res.output
    assert load_bundle(Path(res.stdout.strip().splitlines()[-1])).manifest.outputs.labels == words
    pred = await _predict(tmp_path / "repo", "grades", {"a": 0.9, "b": 100.0, "c": 0.0})
    assert list(pred["probabilities"]) == words
    res = _train_labels(data, tmp_path / "bad", "--labels", "low,high")
    assert res.exit_code == 2
    assert "labels ['medium'] that --labels ['low', 'high'] does not list" in res.output
    res = _train_labels(data, tmp_path / "bad", "--task", "regression", "--labels", "a,b")
    assert res.exit_code == 2 and "--labels is for --task classification" in res.output


def test_calibrate_and_evaluate_take_the_target_column(tmp_path: Path) -> None:
    data = _regression_csv(tmp_path / "blood.csv")  # the target column is 'progress'
    repo = tmp_path / "repo"
    calibrated = _train(data, "progress", "regression", repo)
    renamed = tmp_path / "renamed.csv"
    renamed.write_text(data.read_text().replace(",progress", ",y", 1))
    cal = ["calibrate", str(repo / "blood" / "1"), "--out", str(repo), "--samples", "20"]
    res = runner.invoke(app, [*cal, "--data", str(renamed), "--target", "y"])
    assert res.exit_code == 0, res.output
    assert "wrote " + str(repo / "blood" / "3") in res.stdout
    res = runner.invoke(app, [*cal, "--data", str(renamed), "--target", "nope"])
    assert res.exit_code == 2 and "no target column 'nope'" in res.output
    # Without --target: 'target', else the name `train --target` recorded in the manifest.
    ev = ["evaluate", str(calibrated), "--out", str(tmp_path / "report"), "--samples", "20"]
    res = runner.invoke(app, [*ev, "--data", str(data)])
    assert res.exit_code == 0, res.output
    warned = [w for w in res.stderr.splitlines() if w.startswith("warning: ")]
    # The training CSV holds the bundle's training and calibration rows: one warning for each
    # (the calibration rows were warned about twice, once per manifest section).
    assert len(warned) == 2, warned
    assert "60 of the 300 evaluation rows are among the bundle's calibration rows" in warned[1]


def test_a_classifiers_training_csv_serves_calibrate_and_evaluate_as_it_is(
    tmp_path: Path,
) -> None:
    # A classifier's manifest has no outputs.target, so 'grade' was not found: "missing
    # ['target'], unknown ['grade']", although README promises the column `train --target` read.
    data = _classification_csv(tmp_path / "grades.csv")
    repo = tmp_path / "repo"
    args = ["train", "--data", str(data), "--target", "grade", "--task", "classification"]
    res = runner.invoke(app, [*args, "--out", str(repo), "--hidden", "8", "--epochs", "2"])
    assert res.exit_code == 0, res.output
    m = load_bundle(repo / "grades" / "2").manifest
    assert m.outputs.target is None and m.training.provenance["target_column"] == "grade"
    ev = ["evaluate", str(repo / "grades" / "2"), "--out", str(tmp_path / "report")]
    res = runner.invoke(app, [*ev, "--data", str(data), "--samples", "8"])
    assert res.exit_code == 0, res.output
    cal = ["calibrate", str(repo / "grades" / "1"), "--out", str(repo), "--samples", "8"]
    res = runner.invoke(app, [*cal, "--data", str(data)])
    assert res.exit_code == 0, res.output
    assert "wrote " + str(repo / "grades" / "3") in res.stdout


def test_default_referral_refers_its_nominal_share_of_new_rows(tmp_path: Path) -> None:
    # A user's own calibrated classifier referred 80.5 % of held-out rows under the default
    # policy ("any ambiguous set" at 95 %, next to a 90th-percentile epistemic threshold). The
    # triggers are now set jointly to refer 10 % of the calibration rows, so new rows from the
    # same distribution are referred at about 10 %: 200 calibration rows put the rate's sd near
    # sqrt(0.1 * 0.9 / 200) = 0.021, 1000 evaluation rows add 0.0095, so 3 sd is 0.07.
    def rows(seed: int, n: int) -> tuple[np.ndarray, list[str]]:
        x = np.random.default_rng(seed).uniform(-1, 1, size=(n, 3))
        noisy = x[:, 0] + 0.5 * np.random.default_rng(seed + 1).normal(size=n)
        return x, [
            str(v) for v in np.where(noisy > 0.3, "high", np.where(noisy < -0.3, "low", "mid"))
        ]

    x, y = rows(10, 1000)
    data = _write(tmp_path / "own.csv", ["a", "b", "c", "grade"], x, y)
    args = ["train", "--data", str(data), "--target", "grade", "--task", "classification"]
    res = runner.invoke(
        app, [*args, "--out", str(tmp_path / "repo"), "--hidden", "8", "--epochs", "3"]
    )
    assert res.exit_code == 0, res.output
    x, y = rows(20, 1000)
    new = _write(tmp_path / "new.csv", ["a", "b", "c", "grade"], x, y)
    out = tmp_path / "report"
    ev = ["evaluate", str(tmp_path / "repo" / "own" / "2"), "--data", str(new), "--out", str(out)]
    res = runner.invoke(app, [*ev, "--target", "grade"])
    assert res.exit_code == 0, res.output
    referral = json.loads((out / "report.json").read_text())["referral"]
    assert 0.03 <= referral["rate"] <= 0.17, referral
    policy = load_bundle(tmp_path / "repo" / "own" / "2").manifest.referral
    assert policy is not None and policy.derived_from is not None
    assert policy.derived_from.startswith(
        "the triggers together refer 10 % (100 - percentile 90) of the 200"
    )
