"""The real `tritonclient[http]` against a real server process (started once for this module)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from server import Server, serve
from tritonclient.utils import InferenceServerException

from service.api.common import examples
from service.engine.backlog import EXPIRED
from service.errors import DeadlineExceededError

pytestmark = pytest.mark.slow
MODELS = ("breast-cancer", "diabetes", "digits")
OUTPUTS = {
    "breast-cancer": [
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
        "prediction_set",
        "refer",
    ],
    "diabetes": [
        "mean",
        "std",
        "epistemic_std",
        "aleatoric_std",
        "lower",
        "upper",
        "mc_standard_error",
        "refer",
    ],
}
OUTPUTS["digits"] = OUTPUTS["breast-cancer"]
PARAMS = {"seed": 11, "samples": 64}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serve(tmp_path_factory.mktemp("tritonclient")) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    yield c
    c.close()


def batch(model: str, rows: int = 2) -> np.ndarray:
    return np.array(examples.ROWS[model] * rows, dtype=np.float32).reshape(
        rows, *examples.SHAPES[model]
    )


def tensor(x: np.ndarray, datatype: str = "FP32", binary: bool = True) -> triton.InferInput:
    inp = triton.InferInput("input", list(x.shape), datatype)
    inp.set_data_from_numpy(x, binary_data=binary)
    return inp


def refused(call: Any) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value


def test_live_ready_and_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("diabetes") and client.is_model_ready("diabetes", "1")
    assert not client.is_model_ready("nope")
    assert client.get_server_metadata() == {
        "name": "mcserve",
        "version": "0.1.0",
        "extensions": ["binary_tensor_data"],
    }
    meta = client.get_model_metadata("digits")
    assert meta["name"] == "digits" and meta["versions"] == ["1", "2"]
    assert meta["platform"] == "pytorch_mc_dropout"
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert [o["name"] for o in meta["outputs"]] == [*OUTPUTS["digits"], "passes_used"]
    v1 = client.get_model_metadata("digits", "1")
    assert "prediction_set" not in [o["name"] for o in v1["outputs"]]  # not calibrated


@pytest.mark.parametrize("model", MODELS)
def test_infer_json_and_binary_agree(client: triton.InferenceServerClient, model: str) -> None:
    x = batch(model)
    as_json = client.infer(
        model,
        [tensor(x, binary=False)],
        outputs=[triton.InferRequestedOutput(n, binary_data=False) for n in OUTPUTS[model]],
        parameters=PARAMS,
    )
    as_binary = client.infer(model, [tensor(x)], parameters=PARAMS)  # binary both ways
    response = as_binary.get_response()
    assert response["model_name"] == model and response["model_version"] == "2"
    assert response["parameters"]["seed"] == 11 and response["parameters"]["samples"] == 64
    assert all("binary_data_size" in o["parameters"] for o in response["outputs"])
    assert all("data" in o for o in as_json.get_response()["outputs"])
    for name in OUTPUTS[model]:
        got, want = as_binary.as_numpy(name), as_json.as_numpy(name)
        assert got is not None and want is not None
        np.testing.assert_array_equal(got, want)
        assert got.dtype == want.dtype and got.shape[0] == 2
    if model == "diabetes":
        mean = as_binary.as_numpy("mean")
        assert mean is not None and mean.shape == (2, 1)
    else:
        probs, label = as_binary.as_numpy("probabilities"), as_binary.as_numpy("label")
        assert probs is not None and label is not None
        np.testing.assert_array_equal(label, probs.argmax(axis=1))


def test_output_subset_request_id_and_version(client: triton.InferenceServerClient) -> None:
    result = client.infer(
        "diabetes",
        [tensor(batch("diabetes", 3))],
        model_version="1",
        outputs=[
            triton.InferRequestedOutput("upper"),
            triton.InferRequestedOutput("mean", binary_data=False),
        ],
        request_id="req-42",
        parameters={**PARAMS, "confidence": 0.8},
    )
    response = result.get_response()
    assert response["id"] == "req-42" and response["model_version"] == "1"
    assert [o["name"] for o in response["outputs"]] == ["upper", "mean"]
    assert response["parameters"]["confidence"] == 0.8
    assert result.as_numpy("std") is None
    upper, mean = result.as_numpy("upper"), result.as_numpy("mean")
    assert upper is not None and mean is not None
    assert upper.shape == (3, 1) and np.all(upper > mean)


def test_deadline(client: triton.InferenceServerClient) -> None:
    x = [tensor(batch("diabetes"))]
    error = refused(lambda: client.infer("diabetes", x, timeout=1))  # 1 microsecond
    assert error.status() == "504" and error.message() == str(
        DeadlineExceededError(EXPIRED, DeadlineExceededError.QUEUED)
    )
    result = client.infer("diabetes", x, timeout=60_000_000, parameters=PARAMS)
    assert result.as_numpy("mean") is not None


def test_errors_arrive_as_server_messages(client: triton.InferenceServerClient) -> None:
    error = refused(lambda: client.infer("nope", [tensor(batch("diabetes"))]))
    assert error.status() == "404"
    assert (
        error.message() == "model 'nope' is not loaded; GET /v1/models lists the available models"
    )
    wrong_shape = tensor(np.zeros((1, 5), dtype=np.float32))
    error = refused(lambda: client.infer("diabetes", [wrong_shape]))
    assert error.status() == "400"
    assert error.message() == (
        "input 'input': shape [1, 5] does not fit the model; expected [B, 10] with B >= 1 instances"
    )
    ints = tensor(batch("diabetes").astype(np.int32), datatype="INT32")
    error = refused(lambda: client.infer("diabetes", [ints]))
    assert error.status() == "400"
    assert error.message() == (
        "input 'input': datatype INT32 is not supported; send FP32 (FP64 and FP16 are cast to FP32)"
    )
    x = [tensor(batch("diabetes"))]
    error = refused(lambda: client.infer("diabetes", x, parameters={"temperature": 2}))
    assert error.status() == "400"
    assert error.message() == (
        "invalid request: parameters.temperature: Extra inputs are not permitted (unknown key: "
        "check its spelling against the API reference)"
    )
    error = refused(lambda: client.get_model_metadata("nope"))
    assert error.status() == "404"


def test_native_and_tritonclient_agree(
    server: Server, client: triton.InferenceServerClient
) -> None:
    for model in MODELS:
        x = batch(model)
        native = httpx.post(
            f"{server.url}/v1/models/{model}:predict",
            json={"instances": x.tolist(), "parameters": PARAMS},
            timeout=30,
        ).json()["predictions"]
        result = client.infer(model, [tensor(x)], parameters=PARAMS)
        if model == "diabetes":
            mean = result.as_numpy("mean")
            assert mean is not None
            assert mean[:, 0].tolist() == [p["mean"] for p in native]
        else:
            probs = result.as_numpy("probabilities")
            assert probs is not None
            assert probs.tolist() == [list(p["probabilities"].values()) for p in native]


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_compressed_requests_and_responses(
    client: triton.InferenceServerClient, algorithm: str, binary: bool
) -> None:
    """tritonclient's `request_compression_algorithm` (Content-Encoding) was a 400 "Invalid
    JSON"; responses asked for compressed come back plain, which tritonclient reads."""
    x = batch("digits")
    plain = client.infer("digits", [tensor(x, binary=binary)], parameters=PARAMS)
    packed = client.infer(
        "digits",
        [tensor(x, binary=binary)],
        parameters=PARAMS,
        request_compression_algorithm=algorithm,
        response_compression_algorithm=algorithm,
    )
    for name in OUTPUTS["digits"]:
        got, want = packed.as_numpy(name), plain.as_numpy(name)
        assert got is not None and want is not None
        np.testing.assert_array_equal(got, want)


def test_model_control_with_tritonclient(tmp_path: Path) -> None:
    """tritonclient's unload_model() sends its body without a Content-Type, and
    `unload_dependents` as a boolean: every call was a 400. load_model(config=...) was a 200
    that ignored the config."""
    import hashlib
    import json
    import shutil

    root = Path(__file__).resolve().parents[2] / "models"
    shutil.copytree(root / "diabetes", tmp_path / "models" / "diabetes")
    key = "admin-key-for-the-test"
    keys = [{"id": "ops", "sha256": hashlib.sha256(key.encode()).hexdigest(), "admin": True}]
    env = {"MCSERVE_MODEL_CONTROL": "explicit", "MCSERVE_API_KEYS": json.dumps(keys)}
    auth = {"Authorization": f"Bearer {key}"}
    with serve(tmp_path, model_dir=tmp_path / "models", env=env) as s:
        c = triton.InferenceServerClient(url=f"127.0.0.1:{s.port}")
        try:
            c.unload_model("diabetes", headers=auth, unload_dependents=True)
            index = c.get_model_repository_index(headers=auth)  # on disk, not loaded
            assert {(m["name"], m["state"], m["reason"]) for m in index} == {
                ("diabetes", "UNAVAILABLE", "unloaded")
            }
            err = refused(lambda: c.load_model("diabetes", headers=auth, config="{}"))
            assert "load parameters ['config'] are not supported" in err.message()
            c.load_model("diabetes", headers=auth)
            assert c.is_model_ready("diabetes", headers=auth)
            c.unload_model("diabetes", headers=auth)
            assert not c.is_model_ready("diabetes", headers=auth)
        finally:
            c.close()
