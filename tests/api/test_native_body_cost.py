"""What a large /v1 body may cost the event loop (issue 27, finding 5): a body with more values
than the model can take is refused before it is parsed; a large valid one is converted on a
worker thread."""

from __future__ import annotations

import json
import random
import re
import threading
from typing import Any

import httpx
import orjson
import pytest

from service.api.common import call
from service.api.native import predict as native
from service.api.native.schemas import PredictRequest
from service.bundle.spec import InputSpec
from service.engine import inputs
from service.errors import PayloadTooLargeError

URL = "/v1/models/clf:predict"  # shape [4], max_instances=50, max_body_bytes=64_000
ROW = [0.1, -0.2, 0.3, 0.4]


@pytest.fixture
def parses(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Sizes of the bodies pydantic parsed."""
    seen: list[int] = []
    original = PredictRequest.model_validate_json

    def spy(cls: type[PredictRequest], data: Any, *args: Any, **kwargs: Any) -> PredictRequest:
        seen.append(len(data))
        return original(data, *args, **kwargs)

    monkeypatch.setattr(PredictRequest, "model_validate_json", classmethod(spy))
    return seen


@pytest.mark.parametrize(
    "content",
    [
        b'{"instances": [' + b"[0]," * 15_000 + b"[0]]}",  # the finding's body, scaled to 60 KB
        b'{"instances": [[' + b"0," * 20_000 + b"0]]}",  # one instance of 20,001 numbers
        b'{"instances": ' + b"[" * 30_000 + b"]" * 30_000 + b"}",  # nesting
    ],
    ids=["many-instances", "huge-instance", "deep"],
)
async def test_too_many_values_are_refused_before_the_body_is_parsed(
    client: httpx.AsyncClient, parses: list[int], content: bytes
) -> None:
    r = await client.post(URL, content=content, headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text
    assert "more than 50 instances of shape [4] can need" in r.json()["error"]
    assert "setting max_instances" in r.json()["error"]
    assert parses == []  # the 413 came before pydantic (it was after parse and conversion)


async def test_a_large_body_is_parsed_and_converted_off_the_event_loop(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Thresholds lowered so that a body under this app's 64 KB limit counts as large.
    monkeypatch.setattr(call, "OFF_LOOP_BYTES", 500)
    monkeypatch.setattr(call, "OFF_LOOP_VALUES", 100)
    threads: dict[str, int] = {}
    original_parse, original_convert = PredictRequest.model_validate_json, native.to_array

    def parse(cls: type[PredictRequest], data: Any) -> PredictRequest:
        threads["parse"] = threading.get_ident()
        return original_parse(data)

    def convert(*args: Any) -> Any:
        threads["convert"] = threading.get_ident()
        return original_convert(*args)

    monkeypatch.setattr(PredictRequest, "model_validate_json", classmethod(parse))
    monkeypatch.setattr(native, "to_array", convert)
    # The largest valid request (50 instances) passes check_size and is answered.
    r = await client.post(URL, json={"instances": [ROW] * 50, "parameters": {"samples": 4}})
    assert r.status_code == 200, r.text
    loop_thread = threading.get_ident()  # the test and the in-process app share one loop
    assert set(threads) == {"parse", "convert"}
    assert threads["parse"] != loop_thread, threads
    assert threads["convert"] != loop_thread, threads


@pytest.mark.parametrize(
    "spec",
    [
        InputSpec(shape=[4], feature_names=["a,b", "c", "[d]", "e"]),
        InputSpec(shape=[1, 8, 8]),
        InputSpec(shape=[1]),
    ],
)
def test_no_valid_request_is_over_the_bound(spec: InputSpec) -> None:
    """The densest valid bodies (no spaces, objects with separators in their names) pass."""
    n = 1
    for d in spec.shape:
        n *= d
    flat = [0] * n
    nested: Any = flat
    for d in reversed(spec.shape[1:]):
        nested = [nested[i : i + d] for i in range(0, len(nested), d)]
    bodies = [{"instances": [nested] * 7, "parameters": {"confidence": [0.5] * 5}}]
    if spec.feature_names:
        bodies.append({"instances": [dict.fromkeys(spec.feature_names, 0)] * 7})
    for body in bodies:
        inputs.check_size(orjson.dumps(body), spec, 7)  # no PayloadTooLargeError
    with pytest.raises(PayloadTooLargeError):
        inputs.check_size(b"[" * (inputs.value_bound(spec, 7) + 1), spec, 7)
    assert inputs.value_bound(spec, 7) < 2 * 7 * 3 * max(n, 4) + 1100  # the bound stays tight


def _reference_count(raw: bytes) -> int:
    """The JSON strings removed by their grammar, then the separators counted."""
    bare = re.sub(rb'"[^"\\]*(?:\\.[^"\\]*)*"', b'""', raw)
    return bare.count(b",") + bare.count(b"[") + bare.count(b"{")


def test_separators_are_counted_outside_strings_only() -> None:
    """Random JSON with commas, brackets, quotes and backslash runs inside its strings (seeded):
    the vectorized count equals the grammar's."""
    rng = random.Random(7)
    alphabet = ["a", ",", "[", "{", '"', "\\", "\\\\", "é", "\n", " "]
    for _ in range(2000):
        body: list[Any] = []
        for _ in range(rng.randint(0, 6)):
            s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
            body.append(rng.choice([s, {s: [s, 1]}, [1, [2, s]], 3.5]))
        raw = json.dumps(body, ensure_ascii=rng.random() < 0.5).encode()
        assert inputs.separators_outside_strings(raw) == _reference_count(raw), raw
    assert inputs.separators_outside_strings(b'["a\\\\", "b\\"c,", [1, 2]]') == 5  # [ , , [ ,
