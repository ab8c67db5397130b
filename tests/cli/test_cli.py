"""`python -m service models` and `predict` on the three bundled models."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from server import ROOT
from typer.testing import CliRunner

from service.cli import app

runner = CliRunner()
MODELS = ROOT / "models"


def first_instance(name: str) -> str:
    with (MODELS / "data" / f"{name}-test.csv").open() as f:
        row = next(csv.DictReader(f))
    row.pop("target")
    values = {k: float(v) for k, v in row.items()}
    if name == "digits":
        px = list(values.values())
        return json.dumps([[px[r * 8 : r * 8 + 8] for r in range(8)]])
    return json.dumps(values)


def test_models_lists_the_bundled_models() -> None:
    result = runner.invoke(app, ["models", "--model-dir", str(MODELS)])
    assert result.exit_code == 0, result.output
    header, *lines = result.output.strip().splitlines()
    assert header.split() == ["MODEL", "VERSION", "SERVED", "STATUS", "TASK", "DIGEST"]
    found = [tuple(line.split()[:3]) for line in lines]
    # Version 1 as built, version 2 its calibrated copy (python -m service calibrate), which is
    # the one a request without a version gets; medical-abstracts' network changed twice and
    # gained a word list, so its newest pair is 8 (built) and 9 (calibrated, served), beside the
    # old 1-7.
    names = ("breast-cancer", "diabetes", "digits")
    text = [("medical-abstracts", v, "ready") for v in "12345678"] + [
        ("medical-abstracts", "9", "*")
    ]
    assert found == [t for n in names for t in ((n, "1", "ready"), (n, "2", "*"))] + text
    assert all(" ready " in line for line in lines)
    assert [line.index("ready") for line in lines] == [header.index("STATUS")] * len(lines)


def test_models_reports_a_broken_bundle(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(MODELS / "diabetes", repo / "diabetes")
    shutil.copytree(MODELS / "digits", repo / "digits")
    (repo / "digits" / "1" / "weights.safetensors").write_bytes(b"broken")
    result = runner.invoke(app, ["models", "--model-dir", str(repo)])
    assert result.exit_code == 2
    assert "diabetes         1               ready" in result.output
    assert "diabetes         2        *      ready" in result.output
    assert "digits           1               FAILED" in result.output
    assert "digits           2        *      ready" in result.output  # the calibrated copy
    assert "weights.safetensors: sha256 does not match the manifest (tampered?)" in result.output


@pytest.mark.parametrize("name", ["breast-cancer", "diabetes", "digits"])
def test_predict(name: str) -> None:
    args = [
        "predict",
        name,
        "--instance",
        first_instance(name),
        "--samples",
        "50",
        "--seed",
        "3",
        "--model-dir",
        str(MODELS),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["seed"] == 3 and out["samples"] == 50 and out["model"]["name"] == name
    again = json.loads(runner.invoke(app, args).output)
    assert again["predictions"] == out["predictions"]  # seeded: replayable
    pred = out["predictions"][0]
    if name == "diabetes":
        assert pred["std"] > 0
    else:
        assert pred["label"] in pred["probabilities"]


def test_predict_dropout_sites() -> None:
    base = ["predict", "diabetes", "--instance", first_instance("diabetes"), "--seed", "3"]
    base += ["--model-dir", str(MODELS)]
    every = json.loads(runner.invoke(app, base).output)
    last = runner.invoke(app, [*base, "--dropout-sites", "1"])
    assert last.exit_code == 0, last.output
    out = json.loads(last.output)
    assert out["dropout_sites"] == 1 and every["dropout_sites"] == "all"
    assert out["predictions"] != every["predictions"]
    result = runner.invoke(app, [*base, "--dropout-sites", "3"])
    assert result.exit_code == 2 and "1 <= k <= 2" in result.output
    result = runner.invoke(app, [*base, "--dropout-sites", "some"])
    assert result.exit_code == 2 and "give all or a number k" in result.output


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        (["--mode", "foo"], "error: --mode: Input should be 'mc' or 'deterministic'"),
        (["--samples", "1"], "error: --samples: Input should be greater than or equal to 2"),
        (["--seed", "-1"], "error: --seed: Input should be greater than or equal to 0"),
        (["--samples", "auto", "--tolerance", "-1"], "error: --tolerance: Input should be"),
        (["--samples", "\u00b2"], "give a number of passes or auto"),
        (["--dropout-sites", "\u00b3"], "give all or a number k"),
    ],
)
def test_predict_flags_the_api_refuses_are_an_error_line(extra: list[str], said: str) -> None:
    """Each printed a traceback and exited 1 (pydantic's error is no McServeError; '²' passed
    isdigit() and failed int())."""
    base = ["predict", "diabetes", "--instance", first_instance("diabetes")]
    result = runner.invoke(app, [*base, "--model-dir", str(MODELS), *extra])
    assert result.exit_code == 2 and said in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_predict_ignores_what_only_a_server_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    """predict ran the server's start-up checks: an audit directory it never writes, or models
    a server must have, stopped it (exit 2); a value that does not parse still does."""
    monkeypatch.setenv("MCSERVE_AUDIT", "true")
    monkeypatch.setenv("MCSERVE_AUDIT_PATH", "/proc/nope/audit.db")
    monkeypatch.setenv("MCSERVE_REQUIRED_MODELS", '["other"]')
    args = ["predict", "diabetes", "--instance", first_instance("diabetes"), "--seed", "1"]
    result = runner.invoke(app, [*args, "--samples", "20", "--model-dir", str(MODELS)])
    assert result.exit_code == 0, result.output
    monkeypatch.setenv("MCSERVE_MAX_SAMPLES", "x")
    result = runner.invoke(app, [*args, "--model-dir", str(MODELS)])
    assert result.exit_code == 2 and "MCSERVE_MAX_SAMPLES" in result.output


def test_models_and_predict_read_the_model_dir_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Their option's default `Path("models")` had always won over MCSERVE_MODEL_DIR, and a
    setting that does not parse ended `models` in a pydantic traceback."""
    repo = tmp_path / "repo"
    shutil.copytree(MODELS / "diabetes", repo / "diabetes")
    monkeypatch.chdir(tmp_path)  # no ./models here: only the setting finds a model
    monkeypatch.setenv("MCSERVE_MODEL_DIR", str(repo))
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0, result.output
    assert [line.split()[0] for line in result.output.splitlines()[1:]] == ["diabetes"] * 2
    args = ["predict", "diabetes", "--instance", first_instance("diabetes"), "--samples", "8"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["model"]["name"] == "diabetes"
    # The flag still wins over the setting.
    result = runner.invoke(app, ["models", "--model-dir", str(tmp_path / "none")])
    assert result.exit_code == 1 and f"no bundles under {tmp_path / 'none'}" in result.output
    monkeypatch.setenv("MCSERVE_MAX_SAMPLES", "x")
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: invalid settings: MCSERVE_MAX_SAMPLES: ")
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_predict_errors() -> None:
    result = runner.invoke(
        app, ["predict", "nope", "--instance", "[1]", "--model-dir", str(MODELS)]
    )
    assert result.exit_code == 2
    assert "model 'nope' is not loaded" in result.output
    result = runner.invoke(
        app, ["predict", "diabetes", "--instance", "[1, 2]", "--model-dir", str(MODELS)]
    )
    assert result.exit_code == 2
    assert "instance 0 has shape [2], expected [10]" in result.output


FACTORY = """
from torch import nn


def build():
    return nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Dropout(0.25), nn.Linear(8, 2))


def no_dropout():
    return nn.Sequential(nn.Linear(3, 2))
"""


def test_package_from_factory_and_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from safetensors.torch import save_file

    from service.bundle import load_bundle

    (tmp_path / "my_nets.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import my_nets  # type: ignore[import-not-found]

    model = my_nets.build()
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors")
    )
    args = [
        "package",
        "my_nets:build",
        "--weights",
        "w.safetensors",
        "--input-shape",
        "3",
        "--name",
        "mine",
        "--version",
        "1",
        "--task",
        "classification",
        "--labels",
        "no,yes",
        "--intended-use",
        "a test",
        "--out",
        str(tmp_path / "repo"),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    bundle = load_bundle(tmp_path / "repo" / "mine" / "1")
    x = torch.randn(4, 3)
    with torch.inference_mode():
        assert torch.allclose(bundle.module(x), model.eval()(x), atol=1e-6)
    torch.save(my_nets.no_dropout().state_dict(), tmp_path / "nd.pt")
    args[1], args[3], args[9] = "my_nets:no_dropout", "nd.pt", "2"
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "the model has no dropout layer with p > 0" in result.output


def test_package_sets_units_and_training_ranges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors.torch import save_file

    from service.bundle import load_bundle

    (tmp_path / "my_nets.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import my_nets

    model = my_nets.build()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, "w.safetensors")
    (tmp_path / "training.json").write_text("[[0, 1], [2, 3], [4, 5]]")
    base = ["package", "my_nets:build", "--weights", "w.safetensors", "--input-shape", "3"]
    base += ["--task", "classification", "--labels", "no,yes", "--intended-use", "a test"]
    base += ["--name", "mine", "--out", str(tmp_path / "repo")]
    result = runner.invoke(
        app,
        [
            *base,
            "--version",
            "1",
            "--feature-names",
            "a,b,c",
            "--units",
            "mg/dL,,years",
            "--valid-ranges",
            "[[-10, 10], [-20, 20], [-30, 30]]",
            "--training-ranges",
            "training.json",
        ],
    )
    assert result.exit_code == 0, result.output
    spec = load_bundle(tmp_path / "repo" / "mine" / "1").manifest.inputs
    assert spec.units == ["mg/dL", None, "years"]
    assert spec.training_ranges == [(0, 1), (2, 3), (4, 5)]
    result = runner.invoke(app, [*base, "--version", "2", "--training-ranges", "[[0, 1], [2]]"])
    assert result.exit_code == 2
    assert "--training-ranges: give a JSON list with one [lo, hi] per feature" in result.output
    # The help keeps its example: typer's Rich markup had taken "[lo, hi]" for a tag.
    result = runner.invoke(app, ["package", "--help"], env={"COLUMNS": "300"})
    assert "JSON list of [lo, hi] per feature, e.g. '[[0, 120], [0, 1]]'" in result.output


def test_predict_text(tmp_path: Path) -> None:
    """`predict MODEL --text` on a text model: tokenized, answered, the tokens reported."""
    from text_nets import save_text_model

    save_text_model(tmp_path, intended_use="tests")
    base = ["predict", "notes", "--model-dir", str(tmp_path), "--seed", "2", "--samples", "8"]
    result = runner.invoke(app, [*base, "--text", "acute stroke"])
    assert result.exit_code == 0, result.output
    pred = json.loads(result.output)["predictions"][0]
    assert pred["label"] in ("a", "b", "c") and pred["truncated"] is False and pred["tokens"] > 0
    empty = runner.invoke(app, [*base, "--text", "  "])
    assert empty.exit_code == 2 and "the text is empty" in empty.output
    neither = runner.invoke(app, base)
    assert (
        neither.exit_code == 2
        and "give one of --instance JSON, --text TEXT or --audio" in neither.output
    )


def test_predict_audio(tmp_path: Path) -> None:
    """`predict MODEL --audio FILE` on an audio model: the WAV file read, its features
    computed, answered with its length."""
    from audio_nets import save_audio_model, tone, wav

    save_audio_model(tmp_path / "repo")
    clip = tmp_path / "clip.wav"
    clip.write_bytes(wav(tone(2500.0, 0.25)))
    base = ["predict", "tones", "--model-dir", str(tmp_path / "repo"), "--samples", "8"]
    result = runner.invoke(app, [*base, "--audio", str(clip)])
    assert result.exit_code == 0, result.output
    pred = json.loads(result.output)["predictions"][0]
    assert pred["label"] == "high" and pred["seconds"] == 0.25 and pred["truncated"] is False
    missing = runner.invoke(app, [*base, "--audio", str(tmp_path / "none.wav")])
    assert missing.exit_code == 2 and "--audio: cannot read" in missing.output
    clip.write_bytes(b"not audio")
    bad = runner.invoke(app, [*base, "--audio", str(clip)])
    assert bad.exit_code == 2 and "instance 0: the audio is not a WAV file" in bad.output
    # Read as calibrate reads a file: /dev/zero took 5 GB before its size was checked.
    endless = runner.invoke(app, [*base, "--audio", "/dev/zero"])
    assert endless.exit_code == 2 and "--audio: '/dev/zero' is not a file" in endless.output
    with clip.open("wb") as f:
        f.truncate(100_000_000)  # sparse
    big = runner.invoke(app, [*base, "--audio", str(clip)])
    assert big.exit_code == 2 and "is over this model's limit of 6000000 bytes" in big.output
    other = ["predict", "diabetes", "--audio", str(clip), "--model-dir", str(MODELS)]
    wrong = runner.invoke(app, other)
    assert wrong.exit_code == 2 and "model 'diabetes' is not an audio model" in wrong.output


@pytest.mark.parametrize("samples", ["0", "-5"])
def test_evaluate_refuses_samples_below_one(tmp_path: Path, samples: str) -> None:
    """`--samples 0` had silently run the model's default 100 passes (`samples or default`)."""
    args = ["evaluate", str(MODELS / "diabetes" / "2"), "--out", str(tmp_path / "report")]
    data = str(MODELS / "data" / "diabetes-test.csv")
    result = runner.invoke(app, [*args, "--data", data, "--samples", samples])
    assert result.exit_code == 2, result.output
    assert f"samples must be in [1, 1048575], got {samples}" in result.output
    assert not (tmp_path / "report").exists()


def test_predict_loads_only_the_model_it_answers_for(monkeypatch: pytest.MonkeyPatch) -> None:
    """`predict diabetes` loaded every bundle of the repository (nine medical-abstracts
    versions among them) before answering one row."""
    from service.engine import registry

    built: list[str] = []
    build = registry.Registry.build

    def counted(self: registry.Registry, name: str, version: str | None, path: Path) -> Any:
        built.append(name)
        return build(self, name, version, path)

    monkeypatch.setattr(registry.Registry, "build", counted)
    args = ["predict", "diabetes", "--instance", first_instance("diabetes"), "--samples", "8"]
    result = runner.invoke(app, [*args, "--model-dir", str(MODELS)])
    assert result.exit_code == 0, result.output
    assert set(built) == {"diabetes"} and len(built) == len(list((MODELS / "diabetes").iterdir()))
    missing = runner.invoke(
        app, ["predict", "nope", "--instance", "[1]", "--model-dir", str(MODELS)]
    )
    assert missing.exit_code == 2 and "model 'nope' is not loaded" in missing.output
