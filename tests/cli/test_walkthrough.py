"""The README read as a new user would (issue 28): the quick start's request, then a model of
one's own saved from Python, calibrated and evaluated, and models trained from CSV files with
numeric and with word labels; all served by one app, in process, each answer checked as the
README says it reads. Tiny models, few passes and epochs: the whole walk takes about 20 s."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from nets import mlp
from server import ROOT
from typer.testing import CliRunner

from service.api.app import create_app
from service.bundle import load_bundle
from service.cli import app as cli
from service.packaging import save
from service.settings import Settings

runner = CliRunner()
README = (ROOT / "README.md").read_text()
NAMES = ["dose", "age", "weight"]
TRAINING = [(0.0, 10.0), (20.0, 80.0), (40.0, 120.0)]


def quick_start_request() -> tuple[str, dict[str, Any]]:
    """The quick start's curl: its URL path and JSON body, as the README prints them."""
    m = re.search(r"curl -s localhost:8000(\S+:predict) .*?-d '(\{.*?\})'", README, re.S)
    assert m is not None, "the README's quick start has no predict request"
    return m[1], json.loads(m[2])


def run(*args: str) -> Any:
    res = runner.invoke(cli, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res


def write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def own_model(repo: Path) -> torch.nn.Module:
    """docs/BUNDLES.md, "Packaging your model": save() with names, units and both ranges."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.BatchNorm1d(3, affine=False), mlp(0.2, 3, 16, 1))
    module[0].running_mean.copy_(torch.tensor([5.0, 50.0, 80.0]))
    module[0].running_var.copy_(torch.tensor([9.0, 300.0, 500.0]))
    save(
        module,
        torch.randn(4, 3),
        out_dir=repo,
        name="mine",
        version="1",
        task="regression",
        target="response",
        target_unit="mg/dL",
        feature_names=NAMES,
        units=["mg", "years", "kg"],
        valid_ranges=[(-50.0, 60.0), (0.0, 120.0), (0.0, 300.0)],
        training_ranges=TRAINING,
        noise_var=0.01,
        intended_use="walkthrough test only",
    )
    return module.eval()


def labelled_rows(module: torch.nn.Module, n: int, seed: int) -> list[list[float]]:
    rng = np.random.default_rng(seed)
    x = np.column_stack([rng.uniform(lo, hi, n) for lo, hi in TRAINING])
    with torch.inference_mode():
        y = module(torch.as_tensor(x, dtype=torch.float32)).double().numpy()[:, 0]
    y = y + rng.normal(0.0, 0.1, n)
    return [[*map(float, r), float(t)] for r, t in zip(x, y, strict=True)]


def classes_csv(path: Path, labels: list[str]) -> Path:
    rng = np.random.default_rng(1)
    x = rng.uniform(-1.0, 1.0, size=(150, 2))
    k = np.minimum(((x[:, 0] + 1) / 2 * len(labels)).astype(int), len(labels) - 1)
    return write_csv(
        path, ["a", "b", "stage"], [[*r, labels[i]] for r, i in zip(x, k, strict=True)]
    )


def train(data: Path, repo: Path, *extra: str) -> Any:
    args = ["train", "--data", data, "--target", "stage", "--task", "classification"]
    return run(*args, "--out", repo, "--hidden", "8", "--epochs", "3", *extra)


async def test_the_readme_walkthrough(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    shutil.copytree(ROOT / "models" / "diabetes", repo / "diabetes")

    # A model of one's own, calibrated on a CSV whose target column has the user's name.
    module = own_model(repo)
    header = [*NAMES, "response"]
    cal = write_csv(tmp_path / "cal.csv", header, labelled_rows(module, 120, 2))
    test = write_csv(tmp_path / "test.csv", header, labelled_rows(module, 80, 3))
    res = run("calibrate", repo / "mine" / "1", "--data", cal, "--out", repo, "--samples", "30")
    assert f"wrote {repo / 'mine' / '2'} (version 2, from 1)" in res.stdout
    report = tmp_path / "report"
    res = run(
        "evaluate",
        repo / "mine" / "2",
        "--data",
        test,
        "--target",
        "response",
        "--out",
        report,
        "--samples",
        "30",
    )
    numbers = json.loads((report / "report.json").read_text())
    assert numbers["data"]["rows"] == 80 and numbers["overlap_warnings"] == []
    assert set(numbers["referral"]["trigger_rates"]) == {
        "epistemic",
        "interval_width",
        "extrapolation",
    }
    assert "## Referral" in (report / "report.md").read_text()

    # Trained from CSV files: numeric labels in numeric order, words as --labels orders them.
    res = train(classes_csv(tmp_path / "stages.csv", ["1", "2", "10"]), repo)
    assert "classes in output order: ['1', '2', '10']" in res.stderr
    res = train(
        classes_csv(tmp_path / "grades.csv", ["low", "medium", "high"]),
        repo,
        "--labels",
        "low,medium,high",
    )
    assert load_bundle(repo / "grades" / "2").manifest.outputs.labels == ["low", "medium", "high"]

    res = run("models", "--model-dir", repo)
    served = [line.split()[:2] for line in res.stdout.splitlines()[1:] if " * " in line]
    assert served == [["diabetes", "2"], ["grades", "2"], ["mine", "2"], ["stages", "2"]]

    application = create_app(Settings(model_dir=repo))
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            listed = (await c.get("/v1/models")).json()["models"]
            assert [m["name"] for m in listed] == ["diabetes", "grades", "mine", "stages"]

            # The quick start: the answer names version, digest, backend, device, passes and
            # seed; the same seed gives bit-identical numbers; without one, one is reported.
            path, body = quick_start_request()
            first = await c.post(path, json=body)
            assert first.status_code == 200, first.text
            a = first.json()
            assert a["model"]["version"] == "2" and a["model"]["digest"].startswith("sha256:")
            assert a["backend"] == "torch" and a["device"] == "cpu"
            assert a["samples"] == 200 and a["seed"] == 42
            assert [iv["level"] for iv in a["predictions"][0]["intervals"]] == [0.8, 0.95]
            assert (await c.post(path, json=body)).json()["predictions"] == a["predictions"]
            unseeded = {
                **body,
                "parameters": {k: v for k, v in body["parameters"].items() if k != "seed"},
            }
            assert isinstance((await c.post(path, json=unseeded)).json()["seed"], int)
            assert (await c.get(path)).status_code == 405
            r = await c.post(path, content=json.dumps(body), headers={"content-type": "text/plain"})
            assert r.status_code == 415

            # One's own model: conformal by default once calibrated, extrapolation referred.
            inside = dict(zip(NAMES, [5.0, 50.0, 80.0], strict=True))
            outside = {**inside, "dose": 30.0}
            params = {"samples": 30, "seed": 1}
            r = await c.post(
                "/v1/models/mine:predict",
                json={"instances": [inside, outside], "parameters": params},
            )
            p_in, p_out = r.json()["predictions"]
            assert p_in["intervals"][0]["method"] == "conformal"
            assert p_in["referral"]["extrapolation"] is False
            assert p_out["referral"]["refer"] is True
            assert (
                "feature 'dose' = 30 outside the training range [0, 10]"
                in p_out["referral"]["reasons"]
            )
            r = await c.post(
                "/v1/models/mine:predict", json={"instances": [{**inside, "age": "50"}]}
            )
            assert r.status_code == 422 and "feature 'age'" in r.json()["error"]

            # Trained classifiers answer in the stated order; OIP's label indexes it.
            r = await c.post("/v1/models/stages:predict", json={"instances": [[0.9, 0.0]]})
            assert list(r.json()["predictions"][0]["probabilities"]) == ["1", "2", "10"]
            one = {"instances": [{"a": 0.9, "b": 0.0}], "parameters": {"seed": 5}}
            native = (await c.post("/v1/models/grades:predict", json=one)).json()["predictions"][0]
            assert list(native["probabilities"]) == ["low", "medium", "high"]
            oip = {
                "inputs": [
                    {"name": "input", "shape": [1, 2], "datatype": "FP32", "data": [0.9, 0.0]}
                ],
                "parameters": {"seed": 5},
            }
            out = {
                o["name"]: o
                for o in (await c.post("/v2/models/grades/infer", json=oip)).json()["outputs"]
            }
            assert ["low", "medium", "high"][out["label"]["data"][0]] == native["label"]
