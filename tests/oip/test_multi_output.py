"""A regressor with two named targets (issue 22, item 3): per-target summaries, intervals,
conformal thresholds and referral, through the engine, /v1, /v2 (the real tritonclient against a
real server process) and the `predict` CLI."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.http as triton
from nets import mlp
from server import Server, serve
from typer.testing import CliRunner

from service.bundle import load_bundle
from service.calibration.recalibration import calibrate_bundle
from service.cli import app
from service.engine.model import ServedModel
from service.engine.params import PredictParams
from service.errors import ModelError
from service.packaging import save

pytestmark = pytest.mark.slow
NAMES = ["a", "b", "c"]
TARGETS = ["systolic", "diastolic"]
ROWS = np.array([[0.5, -1.0, 2.0], [0.0, 0.3, -0.2]], dtype=np.float32)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("multi")
    torch.manual_seed(0)
    for name, variance, width in (("bp", None, 2), ("bp-noisy", "log_variance", 4)):
        save(
            mlp(0.25, d_in=3, hidden=16, d_out=width),
            torch.randn(4, 3),
            out_dir=root / "repo",
            name=name,
            version="1",
            task="regression",
            intended_use="tests only",
            target=TARGETS,
            target_unit=["mmHg", "mmHg"],
            feature_names=NAMES,
            noise_var=None,
            variance=variance,  # type: ignore[arg-type]
        )
    # Calibrate bp on rows whose second target is 10 x noisier: its threshold scale differs.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 3)).round(3)
    y = np.stack([x[:, 0] + rng.normal(size=60), 10 * rng.normal(size=60)], axis=1).round(3)
    lines = [",".join([*NAMES, *TARGETS])]
    lines += [",".join(repr(float(v)) for v in [*xr, *yr]) for xr, yr in zip(x, y, strict=True)]
    (root / "cal.csv").write_text("\n".join(lines) + "\n")
    calibrate_bundle(root / "repo" / "bp" / "1", root / "cal.csv", root / "repo", samples=50)
    return root / "repo"


def test_save_checks_the_targets_against_the_outputs(tmp_path: Path) -> None:
    args = {"out_dir": tmp_path, "name": "m", "version": "1", "task": "regression"}
    with pytest.raises(ModelError, match="2 output\\(s\\), got 3"):
        save(mlp(d_in=3, d_out=3), torch.randn(4, 3), intended_use="t", target=TARGETS, **args)
    with pytest.raises(ModelError, match="one unit \\(or None\\) per target"):
        save(mlp(d_in=3, d_out=2), torch.randn(4, 3), intended_use="t", target=TARGETS,
             target_unit=["mmHg"], **args)  # fmt: skip


def test_per_target_summaries_conformal_and_referral(repo: Path) -> None:
    m = load_bundle(repo / "bp" / "2").manifest
    assert [(t.name, t.unit) for t in m.outputs.targets or []] == [
        ("systolic", "mmHg"),
        ("diastolic", "mmHg"),
    ]
    cal, ref = m.calibration, m.referral
    assert cal is not None and ref is not None and ref.targets is not None
    assert cal.scores == [] and cal.target_scores is not None
    assert sorted(cal.target_scores) == sorted(TARGETS)
    served = ServedModel(load_bundle(repo / "bp" / "2"), device="cpu")
    q = served.calibrator.qs(0.9)
    assert q[0] != q[1]  # each target its own threshold
    p = served.predict(ROWS, PredictParams(50, (0.9,), seed=1, interval="conformal"))
    s = p.summary
    assert s.mean.shape == (2, 2) and s.intervals[0].lower.shape == (2, 2)
    raw = served.sampler.run([served.mc_request(ROWS, PredictParams(50, (0.9,), seed=1))])[0]
    np.testing.assert_allclose(s.mean, raw.astype(np.float64).mean(0), rtol=1e-12)
    for d in range(2):  # mean -+ q_d std_d, target by target
        np.testing.assert_allclose(s.intervals[0].upper[:, d], s.mean[:, d] + q[d] * s.std[:, d])
    # A threshold below every value refers both inputs on that target, and the reason says which.
    low = ServedModel(
        load_bundle(repo / "bp" / "2"),
        device="cpu",
        referral_overrides={"bp": {"targets": {"diastolic": {"epistemic": 0.0}}}},
    )
    r = low.predict(ROWS, PredictParams(50, (0.9,), seed=1)).referral
    assert r is not None and r.refer.all()
    assert all(rs[0].startswith("target 'diastolic': epistemic std ") for rs in r.reasons)


@pytest.fixture(scope="module")
def server(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serve(tmp_path_factory.mktemp("multi-server"), model_dir=repo) as s:
        yield s


def test_v1_v2_and_tritonclient_carry_the_target_axis(server: Server) -> None:
    import httpx

    params = {"seed": 5, "samples": 60, "confidence": 0.9}
    for model in ("bp", "bp-noisy"):
        body = {"instances": ROWS.tolist(), "parameters": params}
        v1 = httpx.post(f"{server.url}/v1/models/{model}:predict", json=body, timeout=30).json()
        c = triton.InferenceServerClient(url=f"127.0.0.1:{server.port}")
        try:
            inp = triton.InferInput("input", [2, 3], "FP32")
            inp.set_data_from_numpy(ROWS, binary_data=True)
            res = c.infer(model, [inp], parameters=params)
            meta = c.get_model_metadata(model)
        finally:
            c.close()
        assert {o["name"]: o["shape"] for o in meta["outputs"]}["mean"] == [-1, 2]
        for name in ("mean", "std", "epistemic_std", "aleatoric_std", "lower", "upper"):
            arr = res.as_numpy(name)
            assert arr is not None and arr.shape == (2, 2), name
            for i, pred in enumerate(v1["predictions"]):
                for d, target in enumerate(TARGETS):
                    t = pred["targets"][target]
                    want = t["intervals"][0][name] if name in ("lower", "upper") else t[name]
                    assert arr[i, d] == want, (model, name, i, target)
        if model == "bp-noisy":  # the learned noise is served per target and per input
            ale = res.as_numpy("aleatoric_std")
            assert ale is not None and len({float(v) for v in ale.ravel()}) == 4
    meta_v1 = httpx.get(f"{server.url}/v1/models/bp", timeout=30).json()
    assert [t["name"] for t in meta_v1["outputs"]["targets"]] == TARGETS


def test_predict_cli_prints_each_target(repo: Path) -> None:
    res = CliRunner().invoke(
        app,
        ["predict", "bp", "--instance", json.dumps(ROWS[0].tolist()), "--seed", "3",
         "--model-dir", str(repo)],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    (pred,) = json.loads(res.stdout)["predictions"]
    assert sorted(pred["targets"]) == sorted(TARGETS)
    assert pred["targets"]["systolic"]["intervals"][0]["method"] == "conformal"
    det = CliRunner().invoke(
        app,
        ["predict", "bp", "--instance", json.dumps(ROWS[0].tolist()), "--mode", "deterministic",
         "--model-dir", str(repo)],
    )  # fmt: skip
    assert det.exit_code == 0, det.output
    (point,) = json.loads(det.stdout)["predictions"]
    assert sorted(point["targets"]) == sorted(TARGETS) and "mean" in point["targets"]["systolic"]
