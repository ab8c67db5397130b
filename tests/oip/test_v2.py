"""The Open Inference Protocol (/v2) in process: every endpoint, both codecs, every error."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute

from service.api.common import examples
from service.api.oip import infer
from service.api.oip import routes as v2
from service.engine.backlog import EXPIRED
from service.engine.registry import Entry
from service.errors import DeadlineExceededError, OverloadedError

HEADER = "Inference-Header-Content-Length"
ROWS = examples.ROWS
SHAPES = examples.SHAPES
NP = {"FP64": "<f8", "FP32": "<f4", "FP16": "<f2", "INT64": "<i8", "BOOL": "|b1"}
REGRESSION = [
    "mean",
    "std",
    "epistemic_std",
    "aleatoric_std",
    "lower",
    "upper",
    "mc_standard_error",
    "refer",
]
CLASSIFICATION = [
    "probabilities",
    "probability_std",
    "label",
    "predictive_entropy",
    "expected_entropy",
    "mutual_information",
    "variation_ratio",
    "probability_se",
    "lower",
    "upper",
]
DIABETES = [59.0, 2.0, 32.1, 101.0, 157.0, 93.2, 38.0, 4.0, 4.8598, 87.0]


def body(model: str, rows: int = 1, **parameters: Any) -> dict[str, Any]:
    data = ROWS[model] * rows
    tensor = {"name": "input", "shape": [rows, *SHAPES[model]], "datatype": "FP32", "data": data}
    return {"inputs": [tensor], "parameters": {"seed": 7, "samples": 50, **parameters}}


def tensors(r: httpx.Response) -> dict[str, np.ndarray]:
    """Decode a response (JSON or binary tensors) independently of the server's codec."""
    assert r.status_code == 200, r.text
    raw = r.content
    length = int(r.headers.get(HEADER, len(raw)))
    head = orjson.loads(raw[:length])
    pos, out = length, {}
    for o in head["outputs"]:
        size = (o.get("parameters") or {}).get("binary_data_size")
        if size is None:
            arr = np.array(o["data"], dtype=NP[o["datatype"]])
        else:
            arr = np.frombuffer(raw[pos : pos + size], dtype=NP[o["datatype"]])
            pos += size
        out[o["name"]] = arr.reshape(o["shape"])
    assert pos == len(raw)
    return out


def binary(head: dict[str, Any], *arrays: np.ndarray) -> tuple[bytes, dict[str, str]]:
    js = orjson.dumps(head)
    return js + b"".join(a.tobytes() for a in arrays), {HEADER: str(len(js))}


async def test_health_and_server_metadata(oip: httpx.AsyncClient) -> None:
    assert (await oip.get("/v2/health/live")).json() == {"live": True}
    r = await oip.get("/v2/health/ready")
    assert r.status_code == 200 and r.json() == {"ready": True}
    assert (await oip.get("/v2")).json() == {
        "name": "mcserve",
        "version": "0.1.0",
        "extensions": ["binary_tensor_data"],
    }


async def test_every_v2_route_answers_from_this_adapter(oip: httpx.AsyncClient) -> None:
    """No other router shadows /v2, /v2/health/* or /v2/models/*: each route's answer parses as
    its own response model (a /healthz-style {"status": ...} would not)."""
    routes = [r for r in v2.router.routes if isinstance(r, APIRoute)]
    assert {"/v2", "/v2/health/live", "/v2/health/ready"} <= {r.path for r in routes}
    for route in routes:
        path = route.path.replace("{name}", "diabetes").replace("{version}", "1")
        for method in route.methods:
            r = await oip.request(method, path, json=body("diabetes") if method == "POST" else None)
            assert r.status_code == 200, (path, r.text)
            assert route.response_model is not None
            route.response_model.model_validate(r.json())


async def test_not_ready_while_draining(oip: httpx.AsyncClient, oip_app: FastAPI) -> None:
    st = oip_app.state.mcserve
    st.draining = True
    try:
        r = await oip.get("/v2/health/ready")
        assert r.status_code == 503
        assert r.json() == {"ready": False, "error": "not ready: shutting down"}
        assert (await oip.get("/readyz")).status_code == 503  # the same meaning
        r = await oip.get("/v2/models/diabetes/ready")
        assert r.status_code == 503
        assert r.json()["error"] == (
            "model 'diabetes' version '2' is not ready: the server is shutting down"
        )
        assert (await oip.get("/v2/health/live")).status_code == 200
    finally:
        st.draining = False


async def test_model_metadata(oip: httpx.AsyncClient) -> None:
    meta = (await oip.get("/v2/models/diabetes")).json()
    assert meta == {
        "name": "diabetes",
        "versions": ["1", "2"],
        "platform": "pytorch_mc_dropout",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 10]}],
        "outputs": [
            {"name": n, "datatype": "BOOL" if n == "refer" else "FP64", "shape": [-1, 1]}
            if n != "refer"
            else {"name": n, "datatype": "BOOL", "shape": [-1]}
            for n in REGRESSION
        ]
        + [{"name": "passes_used", "datatype": "INT64", "shape": [-1]}],  # samples=auto
        "parameters": {
            "dropout_sites": "all",
            "sites": 2,
            "allowed": "'all' or k with 1 <= k <= 2 (the last k sites in graph order)",
        },
    }
    assert (await oip.get("/v2/models/diabetes/versions/1")).json() == meta
    digits = (await oip.get("/v2/models/digits")).json()
    assert digits["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert digits["outputs"][:3] == [
        {"name": "probabilities", "datatype": "FP64", "shape": [-1, 10]},
        {"name": "probability_std", "datatype": "FP64", "shape": [-1, 10]},
        {"name": "label", "datatype": "INT64", "shape": [-1]},
    ]
    assert digits["outputs"][7:10] == [
        {"name": n, "datatype": "FP64", "shape": [-1, 10]}
        for n in ("probability_se", "lower", "upper")
    ]
    # Version 2 is calibrated: it adds conformal prediction sets; version 1 has none.
    names2 = [o["name"] for o in digits["outputs"]]
    assert names2 == [*CLASSIFICATION, "prediction_set", "refer", "passes_used"]
    v1 = (await oip.get("/v2/models/digits/versions/1")).json()
    assert [o["name"] for o in v1["outputs"]] == [*CLASSIFICATION, "refer", "passes_used"]
    assert digits["outputs"][-3] == {
        "name": "prediction_set",
        "datatype": "BOOL",
        "shape": [-1, 10],
    }


async def test_a_query_parameter_on_infer_is_refused(oip: httpx.AsyncClient) -> None:
    """`?samples=5&seed=3` ran 100 passes with a drawn seed, silently (/v1 refuses it)."""
    r = await oip.post("/v2/models/diabetes/infer?samples=5&seed=3", json=body("diabetes"))
    assert r.status_code == 400
    assert r.json()["error"] == (
        "unknown query parameter 'samples': inference takes none; parameters go in the body's "
        "'parameters' object"
    )


async def test_metadata_lists_only_versions_that_can_answer(
    oip: httpx.AsyncClient, oip_app: FastAPI, oip_repo: Path
) -> None:
    """A version whose bundle failed to load was listed in `versions`, and naming it was a
    503: a client choosing from the list picked a version that cannot answer."""
    reg = oip_app.state.mcserve.registry
    entries = reg._by_name["diabetes"]
    failed = Entry("diabetes", "3", oip_repo / "diabetes" / "3", error="manifest.json: no file")
    entries.append(failed)
    try:
        paths = ("/v2/models/diabetes", "/v1/models/diabetes", "/v1/models/diabetes/versions/1")
        for path in paths:
            r = await oip.get(path)
            assert r.status_code == 200 and r.json()["versions"] == ["1", "2"], path
        r = await oip.get("/v2/models/diabetes/versions/3")
        assert r.status_code == 503 and "manifest.json: no file" in r.json()["error"]
    finally:
        entries.remove(failed)


async def test_model_ready_and_unknown_models(oip: httpx.AsyncClient) -> None:
    r = await oip.get("/v2/models/digits/ready")
    assert r.json() == {"name": "digits", "version": "2", "ready": True}
    r = await oip.get("/v2/models/digits/versions/1/ready")
    assert r.json() == {"name": "digits", "version": "1", "ready": True}
    for path in ("/v2/models/nope", "/v2/models/nope/ready", "/v2/models/nope/infer"):
        r = await (oip.post(path, json=body("diabetes")) if "infer" in path else oip.get(path))
        assert r.status_code == 404
        assert r.json()["error"] == (
            "model 'nope' is not loaded; GET /v1/models lists the available models"
        )
    r = await oip.get("/v2/models/digits/versions/9/ready")
    assert r.status_code == 404
    assert r.json()["error"] == "model 'digits' has no version '9'; versions: ['1', '2']"
    r = await oip.get("/v2/models/broken")
    assert r.status_code == 503
    assert r.json()["error"].startswith("model 'broken' is not ready: ")
    assert set(r.json()) == {"error", "request_id"}


async def test_infer_regression_json(oip: httpx.AsyncClient) -> None:
    req = body("diabetes", rows=2, confidence=0.9) | {"id": "req-1"}
    r = await oip.post("/v2/models/diabetes/infer", json=req)
    assert r.headers["content-type"] == "application/json" and HEADER.lower() not in r.headers
    out = r.json()
    digest = (await oip.get("/v1/models/diabetes")).json()["digest"]
    assert out["model_name"] == "diabetes" and out["model_version"] == "2"
    assert out["id"] == "req-1"
    assert out["parameters"] == {
        "mode": "mc",
        "backend": "torch",
        "device": "cpu",
        "digest": digest,
        "samples": 50,
        "seed": 7,
        "confidence": 0.9,
        "interval": "conformal",  # version 2's default: it is calibrated
        "dropout_sites": "all",
        "warnings": out["parameters"]["warnings"],
    }
    assert "coverage guarantee assumes" in out["parameters"]["warnings"]
    t = tensors(r)
    assert [o["name"] for o in out["outputs"]] == REGRESSION
    assert all(t[n].shape == (2, 1) for n in REGRESSION if n != "refer")
    assert t["refer"].shape == (2,) and t["refer"].dtype == np.bool_
    np.testing.assert_allclose(t["std"] ** 2, t["epistemic_std"] ** 2 + t["aleatoric_std"] ** 2)
    np.testing.assert_allclose(t["mc_standard_error"], t["epistemic_std"] / math.sqrt(49))
    assert np.all(t["lower"] < t["mean"]) and np.all(t["mean"] < t["upper"])


async def test_infer_classification_json_and_nested_data(oip: httpx.AsyncClient) -> None:
    req = body("digits", rows=2)
    flat = await oip.post("/v2/models/digits/infer", json=req)
    t = tensors(flat)
    # The per-class intervals and standard errors /v1 answers (they were missing here).
    assert (t["lower"] >= 0).all() and (t["lower"] <= t["upper"]).all() and (t["upper"] <= 1).all()
    assert (t["probability_se"] > 0).any()
    few = await oip.post("/v2/models/digits/infer", json=body("digits", samples=10))
    assert np.isnan(tensors(few)["lower"]).all()  # 0.95 needs 40 passes: null, with a warning
    assert "per-class intervals omitted" in str(few.json()["parameters"]["warnings"])
    assert [o["name"] for o in flat.json()["outputs"]] == [
        *CLASSIFICATION,
        "prediction_set",
        "refer",
    ]
    assert t["probabilities"].shape == (2, 10) and t["label"].dtype == np.int64
    np.testing.assert_allclose(t["probabilities"].sum(axis=1), 1.0)
    np.testing.assert_array_equal(t["label"], t["probabilities"].argmax(axis=1))
    assert t["prediction_set"].shape == (2, 10) and t["prediction_set"].dtype == np.bool_
    # Conformal sets take labels in order of probability (1 - p_k <= q).
    for members, probs in zip(t["prediction_set"], t["probabilities"], strict=True):
        if members.any():
            assert probs[members].min() >= probs[~members].max(initial=0.0)
    np.testing.assert_allclose(
        t["predictive_entropy"] - t["expected_entropy"], t["mutual_information"], atol=1e-12
    )
    row = np.array(ROWS["digits"]).reshape(1, 8, 8).tolist()
    req["inputs"][0]["data"] = [row, row]  # nested to the shape [2, 1, 8, 8]
    nested = await oip.post("/v2/models/digits/infer", json=req)
    assert nested.json()["outputs"] == flat.json()["outputs"]


async def test_null_parameters_are_no_parameters(oip: httpx.AsyncClient) -> None:
    """MLServer's InferenceRequest.model_dump() sends every optional field as null: the
    request's `"parameters": null` was a 400 while the others' nulls were read as absent."""
    req = body("diabetes")
    plain = await oip.post("/v2/models/diabetes/infer", json={"inputs": req["inputs"]})
    nulls = {"id": None, "parameters": None, "inputs": req["inputs"], "outputs": None}
    r = await oip.post("/v2/models/diabetes/infer", json=nulls)
    assert r.status_code == 200, r.text
    assert set(tensors(r)) == set(tensors(plain))


async def test_binary_inputs_and_outputs_round_trip(oip: httpx.AsyncClient) -> None:
    for model in ("breast-cancer", "diabetes", "digits"):
        as_json = await oip.post(f"/v2/models/{model}/infer", json=body(model, rows=3))
        head = body(model, rows=3, binary_data_output=True)
        x = np.array(ROWS[model] * 3, dtype=np.float32).reshape(3, *SHAPES[model])
        del head["inputs"][0]["data"]
        head["inputs"][0]["parameters"] = {"binary_data_size": x.nbytes}
        content, headers = binary(head, x)
        r = await oip.post(f"/v2/models/{model}/infer", content=content, headers=headers)
        assert r.headers["content-type"] == "application/octet-stream"
        length = int(r.headers[HEADER])
        outs = orjson.loads(r.content[:length])["outputs"]
        assert all("data" not in o and o["parameters"]["binary_data_size"] > 0 for o in outs)
        got, want = tensors(r), tensors(as_json)
        assert list(got) == list(want)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])
            assert got[name].dtype == want[name].dtype


async def test_fp64_and_fp16_inputs_are_cast(oip: httpx.AsyncClient) -> None:
    base = tensors(await oip.post("/v2/models/diabetes/infer", json=body("diabetes")))
    fp64 = body("diabetes")
    fp64["inputs"][0]["datatype"] = "FP64"
    np.testing.assert_array_equal(
        tensors(await oip.post("/v2/models/diabetes/infer", json=fp64))["mean"], base["mean"]
    )
    half = np.array(ROWS["diabetes"], dtype=np.float16).reshape(1, 10)
    head = body("diabetes")
    del head["inputs"][0]["data"]
    head["inputs"][0] |= {"datatype": "FP16", "parameters": {"binary_data_size": half.nbytes}}
    content, headers = binary(head, half)
    got = tensors(await oip.post("/v2/models/diabetes/infer", content=content, headers=headers))
    same = body("diabetes")
    same["inputs"][0]["data"] = half.astype(np.float64).ravel().tolist()
    want = tensors(await oip.post("/v2/models/diabetes/infer", json=same))
    np.testing.assert_array_equal(got["mean"], want["mean"])


async def test_output_subset_and_binary_choice(oip: httpx.AsyncClient) -> None:
    req = body("breast-cancer", binary_data_output=True)
    req["outputs"] = [
        {"name": "label", "parameters": {"binary_data": False}},
        {"name": "probabilities"},
        {"name": "refer"},
    ]
    r = await oip.post("/v2/models/breast-cancer/infer", json=req)
    outs = orjson.loads(r.content[: int(r.headers[HEADER])])["outputs"]
    assert [o["name"] for o in outs] == ["label", "probabilities", "refer"]
    assert outs[0]["data"] == [0] and "parameters" not in outs[0]
    assert outs[1]["parameters"] == {"binary_data_size": 16} and "data" not in outs[1]
    assert outs[2]["parameters"] == {"binary_data_size": 1}
    t = tensors(r)
    assert t["label"].tolist() == [0] and t["refer"].dtype == np.bool_
    req = body("breast-cancer")
    req["outputs"] = [{"name": "probabilities", "parameters": {"binary_data": True}}]
    r = await oip.post("/v2/models/breast-cancer/infer", json=req)
    assert r.headers[HEADER] and list(tensors(r)) == ["probabilities"]


async def test_deterministic_mode(oip: httpx.AsyncClient) -> None:
    r = await oip.post("/v2/models/digits/infer", json=body("digits", 3, mode="deterministic"))
    out = r.json()
    # The label too (it was refused as an MC output): the class of the largest probability.
    assert [o["name"] for o in out["outputs"]] == ["probabilities", "label"]
    params = out["parameters"]
    assert params["mode"] == "deterministic" and params["backend"] == "onnxruntime"
    assert "seed" not in params and "samples" not in params
    got = tensors(r)
    np.testing.assert_allclose(got["probabilities"].sum(1), 1.0)
    assert got["label"].tolist() == got["probabilities"].argmax(1).tolist()
    v1 = {"instances": [np.reshape(ROWS["digits"], SHAPES["digits"]).tolist()] * 3}
    v1["parameters"] = {"mode": "deterministic", "seed": 7, "samples": 50}
    whole = (await oip.post("/v1/models/digits:predict", json=v1)).json()
    native = whole["predictions"]
    assert [int(p["label"]) for p in native] == got["label"].tolist()
    # the same warnings as /v1 (the note that no uncertainty was computed was missing here)
    assert params["warnings"] == "; ".join(whole["warnings"])
    assert params["warnings"].endswith(
        "deterministic mode: dropout off, no uncertainty was computed"
    )
    req = body("diabetes", mode="deterministic")
    req["outputs"] = [{"name": "std"}]
    r = await oip.post("/v2/models/diabetes/infer", json=req)
    assert r.status_code == 400
    assert r.json()["error"] == (
        "output 'std' needs mode=mc; mode=deterministic (dropout off) answers only ['mean']"
    )
    req["outputs"] = [{"name": "mean"}]
    r = await oip.post("/v2/models/diabetes/infer", json=req)
    assert tensors(r)["mean"].shape == (1, 1)


@pytest.mark.parametrize("version", [None, "1"])
async def test_native_and_oip_agree_bit_for_bit(
    oip: httpx.AsyncClient, version: str | None
) -> None:
    at = f"/versions/{version}" if version else ""
    for model in ("breast-cancer", "diabetes", "digits"):
        instances = [np.array(ROWS[model]).reshape(SHAPES[model]).tolist()] * 2
        native = await oip.post(
            f"/v1/models/{model}{at}:predict",
            json={"instances": instances, "parameters": {"seed": 123, "samples": 64}},
        )
        preds = native.json()["predictions"]
        req = body(model, rows=2, seed=123, samples=64, binary_data_output=True)
        t = tensors(await oip.post(f"/v2/models/{model}{at}/infer", json=req))
        if model == "diabetes":
            assert t["mean"][:, 0].tolist() == [p["mean"] for p in preds]
            assert t["std"][:, 0].tolist() == [p["std"] for p in preds]
        else:
            assert t["probabilities"].tolist() == [list(p["probabilities"].values()) for p in preds]
            labels = [list(p["probabilities"]).index(p["label"]) for p in preds]
            assert t["label"].tolist() == labels
            se = [list(p["probability_se"].values()) for p in preds]
            assert t["probability_se"].tolist() == se


async def test_default_version_is_the_newest(oip: httpx.AsyncClient) -> None:
    r = await oip.post("/v2/models/diabetes/infer", json=body("diabetes"))
    assert r.json()["model_version"] == "2"
    r = await oip.post("/v2/models/diabetes/versions/1/infer", json=body("diabetes"))
    assert r.json()["model_version"] == "1"
    assert r.json()["parameters"]["interval"] == "gaussian"


async def test_reserved_parameters_and_deadline(oip: httpx.AsyncClient) -> None:
    plain = (await oip.post("/v2/models/diabetes/infer", json=body("diabetes"))).json()
    reserved = body("diabetes", sequence_id=5, sequence_start=True, sequence_end=False, priority=1)
    same = (await oip.post("/v2/models/diabetes/infer", json=reserved)).json()
    assert same["outputs"] == plain["outputs"]  # accepted and ignored
    r = await oip.post("/v2/models/diabetes/infer", json=body("diabetes", timeout=1))
    assert r.status_code == 504 and r.json()["error"] == str(
        DeadlineExceededError(EXPIRED, DeadlineExceededError.QUEUED)
    )
    r = await oip.post("/v2/models/diabetes/infer", json=body("diabetes", timeout=60_000_000))
    assert r.status_code == 200
    # tritonclient's int64 at most: a 310-digit timeout overflowed a float (a 500)
    r = await oip.post("/v2/models/diabetes/infer", json=body("diabetes", timeout=10**309))
    assert r.status_code == 400 and "parameters.timeout" in r.json()["error"], r.text


async def test_mlserver_codec_hints_are_read(oip: httpx.AsyncClient) -> None:
    """MLServer's NumpyCodec and request helpers add parameters.content_type and, dumped,
    "headers": null, to the request and to each input: every such request was a 400."""
    plain = await oip.post("/v2/models/diabetes/infer", json=body("diabetes", seed=3))
    req = body("diabetes", seed=3, content_type="np", headers=None)
    req["inputs"][0]["parameters"] = {"content_type": "np", "headers": None}
    r = await oip.post("/v2/models/diabetes/infer", json=req)
    assert r.status_code == 200, r.text
    assert r.json()["outputs"] == plain.json()["outputs"]
    # base64 (encoded BYTES) and pd (a column per input) would be read as something else
    for kind in ("base64", "pd"):
        req["inputs"][0]["parameters"] = {"content_type": kind}
        r = await oip.post("/v2/models/diabetes/infer", json=req)
        assert r.status_code == 400 and "content_type" in r.json()["error"], r.text


def _with(model: str, **change: Any) -> dict[str, Any]:
    b = body(model)
    b["inputs"][0] |= change
    return b


def _params(**extra: Any) -> dict[str, Any]:
    return body("diabetes", **extra)


OUTS = (
    "['mean', 'std', 'epistemic_std', 'aleatoric_std', 'lower', 'upper', 'mc_standard_error', "
    "'refer', 'passes_used']"
)
BAD: list[tuple[dict[str, Any], int, str]] = [
    (
        _with("diabetes", datatype="INT32"),
        400,
        "input 'input': datatype INT32 is not supported; send FP32 (FP64 and FP16 are cast to "
        "FP32)",
    ),
    (
        _with("diabetes", datatype="BYTES", data=["a"] * 10),
        400,
        "input 'input': datatype BYTES is not supported; send FP32 (FP64 and FP16 are cast to "
        "FP32)",
    ),
    (
        _with("diabetes", shape=[1, 5], data=DIABETES[:5]),
        400,
        "input 'input': shape [1, 5] does not fit the model; expected [B, 10] with B >= 1 "
        "instances",
    ),
    (
        _with("diabetes", shape=[0, 10], data=[]),
        400,
        "input 'input': shape [0, 10] does not fit the model; expected [B, 10] with B >= 1 "
        "instances",
    ),
    (
        _with("digits", shape=[1, 64]),
        400,
        "input 'input': shape [1, 64] does not fit the model; expected [B, 1, 8, 8] with B >= 1 "
        "instances",
    ),
    (
        _with("diabetes", shape=[2, 10]),
        400,
        "input 'input': shape [2, 10] holds 20 values but data has 10",
    ),
    (  # the digits transposed: as many values as the shape, nested another way (was a 200)
        _with(
            "digits",
            shape=[2, 1, 8, 8],
            data=np.array(ROWS["digits"] * 2).reshape(2, 64).T.tolist(),
        ),
        400,
        "input 'input': data is nested as [64, 2], its shape is [2, 1, 8, 8]; nest it as the "
        "shape is, or send it flat (row-major)",
    ),
    (
        _with("diabetes", shape=[2, 10], data=[DIABETES[:3], [*DIABETES[3:], *DIABETES]]),
        400,
        "input 'input': data is nested unevenly, its shape is [2, 10]; nest it as the shape "
        "is, or send it flat (row-major)",
    ),
    (_with("diabetes", name="x"), 400, "unknown input 'x'; the model takes one input, 'input'"),
    (
        {"inputs": body("diabetes")["inputs"] * 2},
        400,
        "the model takes one input, 'input'; got ['input', 'input']",
    ),
    (
        _with("diabetes", data=[True, *DIABETES[1:]]),
        400,
        "input 'input': data must hold numbers only (flat or nested), got True",
    ),
    (
        _with("diabetes", data=["59", *DIABETES[1:]]),
        400,
        "input 'input': data must hold numbers only (flat or nested), got '59'",
    ),
    (
        _with("diabetes", data=[200.0, *DIABETES[1:]]),
        400,
        "instance 0, feature 'age' = 200 is outside the valid range [0, 120] years; check the "
        "value and its unit",
    ),
    (
        _with("diabetes", data=[*DIABETES[:3], 10**400, *DIABETES[4:]]),
        400,  # as /v1 says it (it was "not an array of numbers of shape [10]")
        "input 'input': instance 0, feature 'bp': an integer of about 400 digits is beyond "
        "what the model's float32 inputs hold (magnitude at most 3.40282e+38); check the value "
        "and its unit",
    ),
    (
        _with("diabetes", data=None),
        400,
        "input 'input' has no data: give data, or binary_data_size and the bytes after the JSON "
        "header",
    ),
    (
        _with("diabetes", parameters={"binary_data_size": 40}),
        400,
        "input 'input': give either data or parameters.binary_data_size, not both",
    ),
    (
        _params() | {"outputs": [{"name": "nope"}]},
        400,
        f"unknown output 'nope'; model 'diabetes' has outputs {OUTS}",
    ),
    (
        _params() | {"outputs": [{"name": "mean"}, {"name": "mean"}]},
        400,
        "output 'mean' is requested twice",
    ),
    (
        _params() | {"outputs": [{"name": "mean", "parameters": {"classification": 2}}]},
        400,
        "invalid request: outputs.0.parameters.classification: Extra inputs are not permitted "
        "(unknown key: check its spelling against the API reference)",
    ),
    (
        _params(samples=5000),
        400,
        "samples=5000 is over the maximum of 1000 (setting max_samples)",
    ),
    (
        _params(samples=1),
        400,
        "invalid request: parameters.samples: Input should be greater than or equal to 2",
    ),
    (
        _params(confidence=1.5),
        400,
        "invalid request: parameters.confidence: Input should be less than 1",
    ),
    (
        _params(mode="fast"),
        400,
        "invalid request: parameters.mode: Input should be 'mc' or 'deterministic'",
    ),
    (
        _params(temperature=2),
        400,
        "invalid request: parameters.temperature: Extra inputs are not permitted (unknown key: "
        "check its spelling against the API reference)",
    ),
    (
        _params(timeout=0),
        400,
        "invalid request: parameters.timeout: Input should be greater than or equal to 1",
    ),
    (
        {"inputs": []},
        400,
        "invalid request: inputs: List should have at least 1 item after validation, not 0",
    ),
    (
        {"inputs": body("diabetes")["inputs"], "outputs": []},
        400,
        "invalid request: outputs: List should have at least 1 item after validation, not 0",
    ),
    (
        body("diabetes", rows=60),
        413,
        "60 instances in one request; the limit is 50 (setting max_instances): split the request",
    ),
]


@pytest.mark.parametrize(("payload", "status", "message"), BAD)
async def test_bad_requests(
    oip: httpx.AsyncClient, payload: dict[str, Any], status: int, message: str
) -> None:
    inputs = payload["inputs"]
    model = "digits" if inputs and inputs[0]["shape"][1:] in ([64], [1, 8, 8]) else "diabetes"
    r = await oip.post(f"/v2/models/{model}/infer", json=payload)
    assert r.status_code == status, r.text
    assert r.json()["error"] == message
    assert set(r.json()) == {"error", "request_id"}  # no "details" on /v2


async def test_bad_bodies_and_binary_framing(oip: httpx.AsyncClient) -> None:
    url = "/v2/models/diabetes/infer"
    r = await oip.post(url, content=b"not json", headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"] == (
        "invalid request: body: Invalid JSON: expected ident at line 1 column 2 "
        "(the body must be valid JSON)"
    )
    r = await oip.post(url, content=b"[1]")
    assert r.json()["error"] == "invalid request: body: Input should be an object"
    x = np.array(DIABETES, dtype=np.float32).reshape(1, 10)
    head = body("diabetes")
    del head["inputs"][0]["data"]
    head["inputs"][0]["parameters"] = {"binary_data_size": 40}
    content, headers = binary(head, x)
    cases = [
        (
            {HEADER: "99999"},
            content,
            f"{HEADER} is 99999 but the body holds only {len(content)} bytes",
        ),
        (
            headers,
            content[:-4],
            "the body holds 36 bytes after the JSON header but the inputs' binary_data_size add "
            "up to 40",
        ),
        (
            {HEADER: str(len(orjson.dumps(body("diabetes"))))},
            orjson.dumps(body("diabetes")) + b"abcd",
            "the body holds 4 bytes after the JSON header that no input claims (set "
            "parameters.binary_data_size)",
        ),
        (
            {HEADER: "abc"},
            content,
            "invalid request: header.Inference-Header-Content-Length: Input should be a valid "
            "integer, unable to parse string as an integer",
        ),
    ]
    for hdrs, data, message in cases:
        r = await oip.post(url, content=data, headers=hdrs)
        assert r.status_code == 400, r.text
        assert r.json()["error"] == message
    bad_size = orjson.loads(content[: int(headers[HEADER])])
    bad_size["inputs"][0]["parameters"]["binary_data_size"] = 8
    content, headers = binary(bad_size, x[:, :2])
    r = await oip.post(url, content=content, headers=headers)
    assert r.json()["error"] == (
        "input 'input': binary_data_size is 8 bytes but shape [1, 10] of FP32 needs 40"
    )
    nan = x.copy()
    nan[0, 3] = np.nan
    content, headers = binary(head, nan)
    r = await oip.post(url, content=content, headers=headers)
    assert r.status_code == 400
    assert r.json()["error"] == "instance 0, feature 'bp': NaN and Infinity are not valid inputs"
    r = await oip.post(url, content=b"x" * 70_000)
    assert r.status_code == 413
    assert r.json()["error"].startswith("request body is over 64000 bytes")


async def test_overload_is_429_with_retry_after(
    oip: httpx.AsyncClient, oip_app: FastAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    batcher = oip_app.state.mcserve.batcher("diabetes", None)

    def full(*args: Any, **kwargs: Any) -> Any:
        raise OverloadedError("model 'diabetes' is at capacity; retry later", retry_after_s=2.4)

    monkeypatch.setattr(batcher, "enqueue", full)
    r = await oip.post("/v2/models/diabetes/infer", json=body("diabetes"))
    assert r.status_code == 429 and r.headers["retry-after"] == "2"
    assert r.json()["error"] == "model 'diabetes' is at capacity; retry later"


async def test_unexpected_exception_is_500_and_counted(
    oip: httpx.AsyncClient, oip_app: FastAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any) -> Any:
        raise RuntimeError("boom")

    route = "/v2/models/{name}/infer"
    errors = oip_app.state.metrics.internal_errors

    def count() -> float:
        value = errors.labels(route)._value.get()
        return float(value)

    before = count()
    monkeypatch.setattr(infer, "values", broken)
    r = await oip.post(
        "/v2/models/diabetes/infer", json=body("diabetes"), headers={"x-request-id": "abc"}
    )
    assert r.status_code == 500
    assert r.json() == {
        "error": "internal error; quote request id abc when reporting it",
        "request_id": "abc",
    }
    assert count() == before + 1  # the real Prometheus counter of internal errors


async def test_openapi_routes_declare_schemas_and_working_examples(
    oip: httpx.AsyncClient,
) -> None:
    """Every /v1 and /v2 operation declares its 200 schema; each :predict and infer operation has
    one example per bundled model, and every example answers 200 as given."""
    spec = (await oip.get("/openapi.json")).json()
    sent = 0
    for path, item in spec["paths"].items():
        if not path.startswith(("/v1/", "/v2")) or path.startswith("/v2/repository"):
            continue
        for method, op in item.items():
            ok = op["responses"]["200"]["content"]["application/json"]["schema"]
            assert ok.get("$ref") or ok.get("type"), (method, path)
            params = {p["name"]: p.get("examples", {}) for p in op.get("parameters", [])}
            if method == "post":
                content = op["requestBody"]["content"]["application/json"]
                assert content["schema"], path
                bodies = content["examples"]
                assert list(bodies) == ["breast-cancer", "diabetes", "digits"], path
            else:
                bodies = {m: {"value": None} for m in params.get("name", {"-": None})}
            for key, example in bodies.items():
                url = path
                for name, named in params.items():
                    if name in ("name", "version"):
                        value = named.get(key, named.get("1", {})).get("value")
                        url = url.replace("{" + name + "}", str(value))
                r = await oip.request(method.upper(), url, json=example["value"])
                assert r.status_code == 200, (url, r.text)
                sent += 1
    assert sent >= 30
