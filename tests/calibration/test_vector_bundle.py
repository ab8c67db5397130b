"""A bundle calibrated with vector scaling: what `calibrate --method vector` writes, what the
manifest refuses, and that serving, prediction sets and conformal scores all read the same
probabilities, mean_t softmax(z_t * scale + bias); a temperature-only bundle is unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from calib_repo import CAL_SAMPLES, Repo, build
from typer.testing import CliRunner

from service.api.app import create_app
from service.bundle import load_bundle
from service.bundle.manifest import parse_manifest
from service.calibration import selection
from service.calibration.data import read
from service.cli import app
from service.engine import adaptive, conformal
from service.engine.model import ServedModel
from service.engine.params import PredictParams
from service.engine.sampler import MCRequest
from service.engine.summaries import softmax
from service.errors import BundleError
from service.settings import Settings

runner = CliRunner()
ROWS = np.random.default_rng(7).uniform(-2.5, 2.5, size=(25, 4)).round(3)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Repo:
    """clf 1 (as saved), 2 (temperature, the default) and 3 (`--method vector`)."""
    r = build(tmp_path_factory.mktemp("vector") / "models")
    src, data = r.root / "clf" / "1", r.data / "clf-calibration.csv"
    for method in ("temperature", "vector"):
        args = ["calibrate", str(src), "--data", str(data), "--out", str(r.root)]
        res = runner.invoke(app, [*args, "--samples", str(CAL_SAMPLES), "--method", method])
        assert res.exit_code == 0, res.output
    return r


def test_calibrate_method_vector_writes_the_fields_and_prints_the_choice(repo: Repo) -> None:
    src, data = repo.root / "clf" / "1", repo.data / "clf-calibration.csv"
    args = ["calibrate", str(src), "--data", str(data), "--out", str(repo.root)]
    res = runner.invoke(app, [*args, "--samples", "10", "--method", "vector", "--version", "v"])
    assert res.exit_code == 0, res.output
    assert "method vector: class scale [" in res.output
    assert "--method vector: 5-fold cross-validated NLL temperature " in res.output
    cal = load_bundle(repo.root / "clf" / "v").manifest.calibration
    assert cal is not None and cal.temperature == 1.0
    assert cal.class_scale is not None and cal.class_bias is not None
    assert len(cal.class_scale) == len(cal.class_bias) == 3 and min(cal.class_scale) > 0
    assert cal.fit["method"] == "vector" and cal.fit["requested"] == "vector"
    assert {"cv_nll_temperature", "cv_nll_vector"} <= set(cal.fit)
    # The default writes none of it: the manifest has exactly the keys it had before.
    plain = json.loads((repo.root / "clf" / "2" / "manifest.json").read_text())["calibration"]
    assert not {"class_scale", "class_bias", "fit"} & set(plain)
    # A regressor has no classes to scale.
    reg = [
        "calibrate",
        str(repo.root / "reg" / "1"),
        "--data",
        str(repo.data / "reg-calibration.csv"),
    ]
    bad = runner.invoke(app, [*reg, "--out", str(repo.root), "--method", "auto"])
    assert bad.exit_code == 2 and "scales a classifier's logits" in bad.output
    bad = runner.invoke(app, [*args, "--method", "platt"])
    assert bad.exit_code == 2 and "use one of temperature, vector, auto" in bad.output


def test_served_probabilities_sets_and_scores_use_the_vector_scaled_logits(repo: Repo) -> None:
    served = ServedModel(load_bundle(repo.root / "clf" / "3"), device="cpu")
    cal = served.manifest.calibration
    assert cal is not None and cal.class_scale is not None and cal.class_bias is not None
    s, b = np.array(cal.class_scale), np.array(cal.class_bias)
    p = PredictParams(CAL_SAMPLES, (0.9,), seed=11)
    pred = served.predict(ROWS, p)
    z = served.sample([MCRequest(ROWS, CAL_SAMPLES, 11)])[0].astype(np.float64)  # [T, B, K]
    by_hand = np.mean([softmax(z[t] * s + b) for t in range(CAL_SAMPLES)], axis=0)
    probs = pred.summary.probabilities  # type: ignore[union-attr]
    np.testing.assert_allclose(probs, by_hand, rtol=1e-12, atol=1e-15)
    assert not np.allclose(probs, np.mean(softmax(z), axis=0), atol=1e-3)  # it did something
    (ps,) = pred.summary.prediction_sets  # type: ignore[union-attr]
    q = conformal.quantile(cal.scores, 0.9)
    assert np.array_equal(ps.members, 1.0 - by_hand <= q)
    # The conformal scores come from the calibration rows' vector-scaled probabilities, each
    # row's from a fit on the other folds: in-sample ones (the fit's own rows) undercovered.
    data = read(repo.data / "clf-calibration.csv", served.manifest)
    zc = served.sample([MCRequest(data.x, cal.samples, cal.seed)])[0].astype(np.float64)
    oof = selection.choose(zc, data.y, "vector").held_out  # the fold fits
    assert oof is not None
    expected = np.sort(1.0 - oof[np.arange(data.n), data.y])
    np.testing.assert_allclose(cal.scores, expected, rtol=1e-12, atol=1e-15)
    pc = np.mean([softmax(zc[t] * s + b) for t in range(cal.samples)], axis=0)
    assert not np.allclose(cal.scores, np.sort(1.0 - pc[np.arange(data.n), data.y]))
    # Adaptive passes read them too: its answer is the plain answer at the passes it used.
    a = adaptive.Adaptive(max_samples=64, first=8)
    auto = adaptive.run(served, [ROWS], [PredictParams(8, (0.9,), seed=11)], a)[0]
    assert auto.samples is not None
    again = served.predict(ROWS, PredictParams(auto.samples, (0.9,), seed=11))
    assert np.array_equal(auto.summary.probabilities, again.summary.probabilities)  # type: ignore[union-attr]


def test_a_temperature_only_bundle_answers_as_before(repo: Repo) -> None:
    served = ServedModel(load_bundle(repo.root / "clf" / "2"), device="cpu")
    t = served.calibrator.temperature
    assert served.calibrator.class_scale is None and t != 1.0
    pred = served.predict(ROWS, PredictParams(CAL_SAMPLES, (0.9,), seed=11))
    z = served.sample([MCRequest(ROWS, CAL_SAMPLES, 11)])[0]
    # Bit for bit what the temperature-only code computed: softmax(z / T), mean over passes
    # (laid out passes-last, as summaries.over_passes does).
    old = np.ascontiguousarray(np.moveaxis(softmax(z.astype(np.float64) / t), 0, -1)).mean(-1)
    assert np.array_equal(pred.summary.probabilities, old)  # type: ignore[union-attr]
    assert "class_scale" not in served.calibrator.metadata()


async def test_metadata_over_http_shows_the_scale_and_bias(repo: Repo) -> None:
    api = create_app(Settings(model_dir=repo.root))
    async with api.router.lifespan_context(api):
        transport = httpx.ASGITransport(app=api, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            v3 = (await c.get("/v1/models/clf/versions/3")).json()["calibration"]
            v2 = (await c.get("/v1/models/clf/versions/2")).json()["calibration"]
            page = (await c.get("/models/clf/versions/3")).text
    cal = load_bundle(repo.root / "clf" / "3").manifest.calibration
    assert cal is not None
    assert v3["class_scale"] == cal.class_scale and v3["class_bias"] == cal.class_bias
    assert v3["fit"]["method"] == "vector" and v3["temperature"] == 1.0
    assert not {"class_scale", "class_bias", "fit"} & set(v2)
    assert "Vector scaling" in page and "Method chosen" in page


def _manifest(repo: Repo, version: str) -> dict:
    out: dict = json.loads((repo.root / "clf" / version / "manifest.json").read_text())
    return out


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"class_scale": [1.0, 1.0], "class_bias": [0.0, 0.0]},
            "have 2 values but the model has 3",
        ),
        ({"class_scale": [1.0, 0.0, 1.0]}, "class_scale must be finite and > 0"),
        ({"class_scale": [1.0, -2.0, 1.0]}, "class_scale must be finite and > 0"),
        ({"class_bias": [0.0, float("nan"), 0.0]}, "class_bias must be finite"),
        ({"class_scale": [1.0, float("inf"), 1.0]}, "class_scale must be finite and > 0"),
        ({"class_bias": None}, "class_scale needs calibration.class_bias"),
        ({"class_scale": None}, "class_bias needs calibration.class_scale"),
    ],
)
def test_the_manifest_refuses_bad_vector_fields(repo: Repo, change: dict, message: str) -> None:
    m = _manifest(repo, "3")
    m["calibration"] |= change
    with pytest.raises(BundleError, match="invalid manifest") as err:
        parse_manifest(json.dumps(m).encode(), "manifest.json")
    assert message in str(err.value) and "calibration.class_" in str(err.value)


def test_the_manifest_refuses_vector_fields_on_a_regressor(repo: Repo, tmp_path: Path) -> None:
    data = str(repo.data / "reg-calibration.csv")
    args = ["calibrate", str(repo.root / "reg" / "1"), "--data", data, "--out", str(tmp_path)]
    res = runner.invoke(app, [*args, "--samples", "10"])
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "reg" / "2" / "manifest.json").read_text())
    m["calibration"] |= {"class_scale": [1.0], "class_bias": [0.0]}
    with pytest.raises(BundleError, match="remove them from a regressor's calibration"):
        parse_manifest(json.dumps(m).encode(), "manifest.json")


def test_evaluation_report_and_headline_show_the_scale_and_bias(repo: Repo, tmp_path: Path) -> None:
    from service.api.pages.evaluations import headline

    bundle, data = repo.root / "clf" / "3", repo.data / "clf-test.csv"
    args = ["evaluate", str(bundle), "--data", str(data), "--out", str(tmp_path), "--samples", "20"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    numbers = json.loads((tmp_path / "report.json").read_text())
    cal = load_bundle(bundle).manifest.calibration
    assert cal is not None and numbers["class_scale"] == cal.class_scale
    assert numbers["model"]["calibration"]["class_bias"] == cal.class_bias
    text = (tmp_path / "report.md").read_text()
    assert "| | served (vector scaling) | T = 1 (as trained) |" in text
    assert "Served with vector scaling, per class: scale " in text
    rows = dict(headline(numbers))
    assert rows["class scale"] == ", ".join(f"{v:.4g}" for v in cal.class_scale)


def test_the_deterministic_answer_goes_through_the_calibration(repo: Repo, tmp_path: Path) -> None:
    """mode=deterministic: softmax of the one dropout-off pass's logits, calibrated as the MC
    passes are. Version 3's fitted calibration is replaced by one written by hand (a fit on
    these random labels is degenerate), then also by a temperature alone and by none."""
    import shutil

    import torch

    x = ROWS.astype(np.float32)
    cases = {"vector": (1.5, [0.5, 1.0, 2.0], [0.3, -0.1, -0.2]), "temperature": (2.0, None, None)}
    for name, (t, scale, bias) in cases.items():
        b = tmp_path / name
        shutil.copytree(repo.root / "clf" / "3", b)
        doc = json.loads((b / "manifest.json").read_text())
        doc["calibration"].update(temperature=t, class_scale=scale, class_bias=bias)
        (b / "manifest.json").write_text(json.dumps(doc))
        served = ServedModel(load_bundle(b), device="cpu")
        with torch.inference_mode():
            z = served.bundle.module(torch.as_tensor(x)).double().numpy()
        want = z / t if scale is None else (z / t) * np.array(scale) + np.array(bias)
        got = served.predict(x, PredictParams(1, (0.9,), mode="deterministic")).point
        assert got is not None
        np.testing.assert_allclose(got, softmax(want, axis=-1), rtol=1e-5, atol=1e-6)
        assert np.abs(got - softmax(z, axis=-1)).max() > 1e-2  # not the raw softmax
    raw = ServedModel(load_bundle(repo.root / "clf" / "1"), device="cpu")  # uncalibrated
    with torch.inference_mode():
        z = raw.bundle.module(torch.as_tensor(x)).double().numpy()
    got = raw.predict(x, PredictParams(1, (0.9,), mode="deterministic")).point
    np.testing.assert_allclose(got, softmax(z, axis=-1), rtol=1e-5, atol=1e-6)
