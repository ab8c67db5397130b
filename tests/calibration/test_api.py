"""The native API over calibrated bundles: conformal intervals, prediction sets, referral,
calibration metadata and the fewer-passes warning."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator

import httpx
import numpy as np
import pytest
import pytest_asyncio
from calib_repo import CAL_SAMPLES, Repo

from service.api.app import create_app
from service.bundle import load_bundle
from service.engine import conformal
from service.settings import Settings

REG_ROW = {"x0": 0.5, "x1": -0.3, "x2": 1.0}
CLF_ROW = [0.1, -0.2, 0.3, 0.4]


@pytest_asyncio.fixture(scope="module")
async def client(calibrated: Repo) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(Settings(model_dir=calibrated.root))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            yield c


async def predict(c: httpx.AsyncClient, name: str, instances: list, **params: object) -> dict:
    r = await c.post(
        f"/v1/models/{name}:predict", json={"instances": instances, "parameters": params}
    )
    assert r.status_code == 200, r.text
    out: dict = r.json()
    return out


async def test_regression_conformal_intervals_by_default(
    client: httpx.AsyncClient, calibrated: Repo
) -> None:
    cal = load_bundle(calibrated.root / "reg" / "2").manifest.calibration
    assert cal is not None
    out = await predict(
        client, "reg", [REG_ROW], samples=CAL_SAMPLES, seed=4, confidence=[0.9, 0.99]
    )
    assert out["model"]["version"] == "2" and out["warnings"] == [
        "the conformal interval at 0.99 is unbounded: the calibration set has n=60 scores, "
        "a finite threshold needs n >= 99"
    ]
    p = out["predictions"][0]
    iv90, iv99 = p["intervals"]
    assert iv90["method"] == "conformal" and iv90["level"] == 0.9
    q = conformal.quantile(cal.scores, 0.9)
    assert iv90["lower"] == pytest.approx(p["mean"] - q * p["std"], rel=1e-12)
    assert iv90["upper"] == pytest.approx(p["mean"] + q * p["std"], rel=1e-12)
    assert iv99["lower"] is None and iv99["upper"] is None  # unbounded, said so above
    assert p["referral"]["refer"] in (True, False) and p["referral"]["extrapolation"] is False
    gauss = await predict(
        client, "reg", [REG_ROW], samples=CAL_SAMPLES, seed=4, interval="gaussian"
    )
    assert gauss["predictions"][0]["intervals"][0]["method"] == "gaussian"
    assert gauss["predictions"][0]["mean"] == p["mean"]


async def test_fewer_passes_than_calibration_warns(client: httpx.AsyncClient) -> None:
    out = await predict(client, "reg", [REG_ROW], samples=10, seed=1, confidence=0.9)
    assert out["warnings"] == [
        f"conformal intervals: the coverage guarantee assumes {CAL_SAMPLES} passes, as used at "
        f"calibration; this request used 10 (ask for samples >= {CAL_SAMPLES})"
    ]
    assert out["predictions"][0]["intervals"][0]["method"] == "conformal"
    clf = await predict(client, "clf", [CLF_ROW], samples=10, seed=1, confidence=0.5)
    assert any("prediction sets: the coverage guarantee assumes" in w for w in clf["warnings"])


async def test_deterministic_mode_has_no_conformal_interval(client: httpx.AsyncClient) -> None:
    out = await predict(client, "reg", [REG_ROW], mode="deterministic")
    assert set(out["predictions"][0]) == {"mean"}
    out = await predict(client, "clf", [CLF_ROW], mode="deterministic")
    assert set(out["predictions"][0]) == {"label", "probabilities"}


async def test_classifier_prediction_set_and_temperature(
    client: httpx.AsyncClient, calibrated: Repo
) -> None:
    m = load_bundle(calibrated.root / "clf" / "2").manifest
    assert m.calibration is not None
    out = await predict(
        client, "clf", [CLF_ROW, [0, 0, 0, 0]], samples=CAL_SAMPLES, seed=2, confidence=[0.8, 0.9]
    )
    assert out["warnings"] == []
    q = conformal.quantile(m.calibration.scores, 0.8)
    for p in out["predictions"]:
        ps = p["prediction_set"]
        assert ps["level"] == 0.8  # the first requested level
        assert ps["labels"] == [k for k, v in p["probabilities"].items() if 1 - v <= q]
        assert p["referral"]["extrapolation"] is False
    # The served probabilities are the temperature-scaled ones: version 1 (T = 1) differs unless
    # the fitted temperature is 1.
    v1 = await client.post(
        "/v1/models/clf/versions/1:predict",
        json={"instances": [CLF_ROW], "parameters": {"samples": CAL_SAMPLES, "seed": 2}},
    )
    p1 = v1.json()["predictions"][0]
    assert "prediction_set" not in p1  # not calibrated
    if not math.isclose(m.calibration.temperature or 1.0, 1.0):
        assert p1["probabilities"] != out["predictions"][0]["probabilities"]


async def test_referral_reasons_in_the_answer(client: httpx.AsyncClient) -> None:
    far = [5.0, 0.0, 0.0, -4.0]  # inside the valid range [-10, 10], outside training [-3, 3]
    out = await predict(client, "clf", [far], samples=CAL_SAMPLES, seed=3)
    ref = out["predictions"][0]["referral"]
    assert ref["refer"] is True and ref["extrapolation"] is True
    assert "feature 'f0' = 5 outside the training range [-3, 3]" in ref["reasons"]
    assert "feature 'f3' = -4 outside the training range [-3, 3]" in ref["reasons"]
    assert ref["triggers"].count("extrapolation") == 2
    r = await client.post(
        "/v1/models/clf:predict", json={"instances": [[11.0, 0, 0, 0]], "parameters": {}}
    )
    assert r.status_code == 422  # the hard valid range is still a refusal, not a referral


async def test_the_set_trigger_reads_the_policys_level_whatever_the_request_shows(
    calibrated: Repo,
) -> None:
    """It read the request's first level: at 50 % sets digits referred 47 % of its test rows
    against the 10 % the policy was fitted to (reviewer ST). The referral is the same at any
    requested level; its reasons name the policy's level."""
    most = 2  # of 3 labels: the 95 % sets here hold 1 to 3, so both kinds of answer occur
    app = create_app(Settings(model_dir=calibrated.root, referral={"clf": {"max_set_size": most}}))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            assert (await client.get("/v1/models/clf")).json()["referral"]["level"] == 0.95
            rows = np.random.default_rng(0).uniform(-2.5, 2.5, size=(40, 4)).round(3).tolist()
            half = await predict(client, "clf", rows, samples=CAL_SAMPLES, seed=5, confidence=0.5)
            own = await predict(client, "clf", rows, samples=CAL_SAMPLES, seed=5, confidence=0.95)
    fired = 0
    for shown, at_95 in zip(half["predictions"], own["predictions"], strict=True):
        assert shown["prediction_set"]["level"] == 0.5
        assert shown["referral"] == at_95["referral"]  # whatever level the request shows
        n = len(at_95["prediction_set"]["labels"])
        ref = shown["referral"]
        assert ("prediction_set" in ref["triggers"]) == (n == 0 or n > most), shown
        set_reasons = [r for r in ref["reasons"] if "prediction set" in r]
        assert all(r.startswith("the 95 % prediction set") for r in set_reasons)
        fired += bool(set_reasons)
    assert 0 < fired < len(rows)  # both kinds of answer were checked


async def test_metadata_reports_calibration(client: httpx.AsyncClient) -> None:
    meta = (await client.get("/v1/models/clf")).json()
    cal = meta["calibration"]
    assert cal["calibrated"] is True and cal["method"] == "split-conformal"
    assert (cal["n"], cal["samples"]) == (60, CAL_SAMPLES) and cal["temperature"] > 0
    assert cal["source"]["version"] == "1"
    assert meta["referral"]["max_set_size"] == 3  # of 3 labels: the empty set refers
    reg = (await client.get("/v1/models/reg")).json()
    assert reg["calibration"]["temperature"] is None
    assert reg["defaults"]["interval"] == "conformal"
    old = (await client.get("/v1/models/reg/versions/1")).json()
    assert old["calibration"] == {"calibrated": False}
