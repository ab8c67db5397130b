"""A text model through the real `tritonclient[http]` (issue 20, item 6): BYTES inputs in JSON
and in the binary extension, against a real server process with its compute process."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from server import Server, serve
from text_nets import save_text_model
from tritonclient.utils import InferenceServerException

pytestmark = pytest.mark.slow
TEXTS = ["Chest pain and shortness of breath", "acute ischemic stroke", "mild gastritis"]
OUTPUTS = ["probabilities", "mutual_information", "label", "tokens", "truncated"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    repo = tmp_path_factory.mktemp("textrepo")
    save_text_model(repo)
    env = {"MCSERVE_COMPUTE_PROCESS": "true"}
    with serve(tmp_path_factory.mktemp("textserver"), model_dir=repo, env=env) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    yield c
    c.close()


def _infer(c: triton.InferenceServerClient, texts: list[str], binary: bool) -> dict[str, object]:
    inp = triton.InferInput("input", [len(texts)], "BYTES")
    inp.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object), binary_data=binary)
    outs = [triton.InferRequestedOutput(n, binary_data=binary) for n in OUTPUTS]
    r = c.infer("notes", [inp], outputs=outs, parameters={"seed": 3, "samples": 16})
    return {
        **{n: r.as_numpy(n) for n in OUTPUTS},
        "parameters": r.get_response()["parameters"],
    }


def test_metadata_says_bytes(client: triton.InferenceServerClient) -> None:
    meta = client.get_model_metadata("notes")
    assert meta["inputs"] == [{"name": "input", "datatype": "BYTES", "shape": [-1]}]
    # Per text, as outputs: the protocol's response parameters hold scalars only.
    assert meta["outputs"][-2:] == [
        {"name": "tokens", "datatype": "INT64", "shape": [-1]},
        {"name": "truncated", "datatype": "BOOL", "shape": [-1]},
    ]


def test_strings_in_json_and_binary_agree_with_v1(
    client: triton.InferenceServerClient, server: Server
) -> None:
    as_json, as_binary = _infer(client, TEXTS, False), _infer(client, TEXTS, True)
    for name in OUTPUTS:
        assert np.array_equal(as_json[name], as_binary[name]), name
    assert as_binary["truncated"].tolist() == [False] * 3
    assert not {"tokens", "truncated"} & set(as_binary["parameters"])  # type: ignore[arg-type]
    native = httpx.post(
        f"http://127.0.0.1:{server.port}/v1/models/notes:predict",
        json={"instances": TEXTS, "parameters": {"seed": 3, "samples": 16}},
        timeout=30,
    ).json()["predictions"]
    probs = np.array([[p["probabilities"][k] for k in ("a", "b", "c")] for p in native])
    assert probs.tobytes() == np.asarray(as_binary["probabilities"], np.float64).tobytes()
    assert [p["tokens"] for p in native] == as_binary["tokens"].tolist()  # type: ignore[attr-defined]


def test_bad_bytes_are_400(client: triton.InferenceServerClient) -> None:
    inp = triton.InferInput("input", [1], "BYTES")
    inp.set_data_from_numpy(np.array([b"chest \xff pain"], dtype=object), binary_data=True)
    with pytest.raises(InferenceServerException) as e:
        client.infer("notes", [inp])
    assert "element 0 is not valid UTF-8" in str(e.value)
    fp = triton.InferInput("input", [1, 16], "FP32")
    fp.set_data_from_numpy(np.zeros((1, 16), np.float32))
    with pytest.raises(InferenceServerException) as e:
        client.infer("notes", [fp])
    assert "this is a text model; send datatype BYTES" in str(e.value)
