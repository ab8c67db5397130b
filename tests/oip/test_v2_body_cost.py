"""What a large /v2 body may cost the event loop (issue 27, finding 5): too many values are
refused before the JSON is parsed, too many instances before a binary tensor is converted,
binary tensors are read as float32 without Python lists, and large bodies convert on a thread."""

from __future__ import annotations

import threading
import tracemalloc
from typing import Any

import httpx
import numpy as np
import orjson
import pytest

from service.api.common import call
from service.api.oip import binary as v2_binary
from service.api.oip import infer as v2
from service.api.oip.schemas import RequestInput
from service.bundle.spec import InputSpec

HEADER = "Inference-Header-Content-Length"
URL = "/v2/models/diabetes/infer"  # shape [10], max_instances=50, max_body_bytes=64_000
DIABETES = [59.0, 2.0, 32.1, 101.0, 157.0, 93.2, 38.0, 4.0, 4.8598, 87.0]


def binary_body(x: np.ndarray, datatype: str = "FP32") -> tuple[bytes, dict[str, str]]:
    raw = x.tobytes()
    tensor = {"name": "input", "shape": list(x.shape), "datatype": datatype}
    head = orjson.dumps({"inputs": [tensor | {"parameters": {"binary_data_size": len(raw)}}]})
    return head + raw, {HEADER: str(len(head)), "content-type": "application/octet-stream"}


async def test_json_data_with_too_many_values_is_refused_before_parsing(
    oip: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    parsed: list[int] = []
    original = v2.parse
    monkeypatch.setattr(v2, "parse", lambda header: parsed.append(len(header)) or original(header))
    tensor = {"name": "input", "shape": [1, 10], "datatype": "FP32", "data": [0] * 12_000}
    r = await oip.post(URL, json={"inputs": [tensor]})
    assert r.status_code == 413, r.text
    assert "more than 50 instances of shape [10] can need" in r.json()["error"]
    assert parsed == []  # was parsed, then walked value by value in Python, then a 400


async def test_binary_with_too_many_instances_is_refused_before_converting(
    oip: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    content, headers = binary_body(np.zeros((1000, 10), dtype=np.float32))  # 40 kB
    converted: list[int] = []
    original = np.frombuffer

    def frombuffer(buffer: Any, *args: Any, **kwargs: Any) -> np.ndarray:
        converted.append(len(buffer))
        return original(buffer, *args, **kwargs)

    monkeypatch.setattr(np, "frombuffer", frombuffer)
    r = await oip.post(URL, content=content, headers=headers)
    assert r.status_code == 413, r.text
    assert r.json()["error"] == (
        "1000 instances in one request; the limit is 50 (setting max_instances): split the request"
    )
    assert converted == []  # was: float64, Python lists, then the count


def test_binary_fp32_is_read_without_python_lists() -> None:
    """10 instances of 100,000 FP32 values (4 MB): the old path made float64 and a list of a
    million Python floats (over 40 MB); now a view of the body and one float32 copy."""
    spec = InputSpec(shape=[100_000])
    x = np.random.default_rng(0).standard_normal((10, 100_000)).astype(np.float32)
    inp = RequestInput(
        name="input",
        shape=[10, 100_000],
        datatype="FP32",
        parameters={"binary_data_size": x.nbytes},  # type: ignore[arg-type]
    )
    raw = x.tobytes()
    tracemalloc.start()
    try:
        out = v2_binary.decode_input([inp], memoryview(raw), spec, 10)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.dtype == np.float32 and np.array_equal(out, x)
    assert out.flags.writeable  # a copy the engine owns, not the request's bytes
    assert peak < 3 * x.nbytes, peak


async def test_a_large_body_is_parsed_and_decoded_off_the_event_loop(
    oip: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(call, "OFF_LOOP_BYTES", 50)  # every body is large
    threads: dict[str, int] = {}
    parse, decode = v2.parse, v2.decode_input

    def parse_spy(header: bytes) -> Any:
        threads["parse"] = threading.get_ident()
        return parse(header)

    def decode_spy(*args: Any) -> Any:
        threads["decode"] = threading.get_ident()
        return decode(*args)

    monkeypatch.setattr(v2, "parse", parse_spy)
    monkeypatch.setattr(v2, "decode_input", decode_spy)
    for content, headers in (
        binary_body(np.array([DIABETES] * 3, dtype=np.float32)),
        (
            orjson.dumps(
                {
                    "inputs": [
                        {"name": "input", "shape": [1, 10], "datatype": "FP32", "data": DIABETES}
                    ]
                }
            ),
            {"content-type": "application/json"},
        ),
    ):
        threads.clear()
        r = await oip.post(URL, content=content, headers=headers)
        assert r.status_code == 200, r.text
        assert set(threads) == {"parse", "decode"}
        assert threading.get_ident() not in threads.values(), threads
