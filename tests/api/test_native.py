"""The native API in process: every endpoint and every error class, status and message."""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest

from service.engine.inputs import to_array

ROW = [0.1, -0.2, 0.3, 0.4]
FEATURES = ["f0", "f1", "f2", "f3"]  # the clf model's (tests/conftest.py)


async def test_health(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "live"}
    r = await client.get("/readyz")
    assert r.status_code == 200 and r.json()["status"] == "ready"


async def test_list_and_metadata(client: httpx.AsyncClient) -> None:
    models = (await client.get("/v1/models")).json()["models"]
    assert {m["name"]: m["ready"] for m in models} == {"clf": True, "reg": True}
    assert models[0]["versions"] == [{"version": "1", "ready": True, "reason": None}]
    meta = (await client.get("/v1/models/clf")).json()
    assert meta["inputs"]["feature_names"] == ["f0", "f1", "f2", "f3"]
    assert meta["inputs"]["units"][0] == "cm"
    assert meta["inputs"]["valid_ranges"][0] == [-10.0, 10.0]
    assert meta["inputs"]["training_ranges"][0] == [-3.0, 3.0]
    assert meta["outputs"]["labels"] == ["red", "green", "blue"]
    assert meta["intended_use"] == "tests only"
    assert meta["defaults"]["samples"] == 100
    assert meta["digest"].startswith("sha256:")
    assert meta["calibration"] == {"calibrated": False}
    same = (await client.get("/v1/models/clf/versions/1")).json()
    assert same == meta


async def test_unknown_model_and_version(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/models/nope")
    assert r.status_code == 404
    assert r.json()["error"] == (
        "model 'nope' is not loaded; GET /v1/models lists the available models"
    )
    r = await client.post("/v1/models/clf/versions/9:predict", json={"instances": [ROW]})
    assert r.status_code == 404
    assert r.json()["error"] == "model 'clf' has no version '9'; versions: ['1']"
    r = await client.get("/v1/nothing")
    assert r.status_code == 404 and "no route GET /v1/nothing" in r.json()["error"]
    # A 60,000-character name or path came back whole (a 60 kB answer): cut, with its length.
    long = "n" * 60_000
    wrong = await client.get(f"/v1/models/{long}:predict")  # the fast path's 405
    for r in (await client.get(f"/v1/models/{long}"), await client.get(f"/v1/{long}"), wrong):
        assert r.status_code in (404, 405) and len(r.content) < 1000, len(r.content)
        assert re.search(r"n\.\.\. \(600\d\d characters\)", r.json()["error"]), r.text


async def test_a_trailing_slash_is_answered_with_where_to_go(client: httpx.AsyncClient) -> None:
    """Starlette's redirect answered an empty 307 naming the server by the request's Host and
    scheme (behind a TLS proxy, http://: a POST's body re-sent in clear). A page or listing
    moves by a relative Location; a call with a body is told where it goes."""
    headers = {"Host": "elsewhere.example"}
    r = await client.get("/v1/models/?x=1", headers=headers)
    assert r.status_code == 307 and r.headers["location"] == "/v1/models?x=1"
    assert r.json()["error"] == "/v1/models/ is at /v1/models (no trailing slash)"
    r = await client.post("/v1/models/clf:predict/", json={"instances": [ROW]}, headers=headers)
    assert r.status_code == 404 and "location" not in r.headers
    assert r.json()["error"] == (
        "no route POST /v1/models/clf:predict/; drop the trailing slash: POST "
        "/v1/models/clf:predict"
    )
    # As sent, percent-encoded: the decoded path put "✓" or CR LF into the header (a 500, or
    # no answer at all from uvicorn).
    for sent in ("/v1/models/%E2%9C%93/", "/v1/models/a%0d%0aSet-Cookie:%20x=1/?q=%C3%A9&b"):
        r = await client.get(sent)
        assert r.status_code == 307, (sent, r.text)
        assert r.headers["location"] == sent.replace("/?", "?").rstrip("/"), r.headers
    r = await client.get("/v1/models%2F")  # a slash sent encoded: it pointed at itself (R10)
    assert r.status_code == 307 and r.headers["location"] == "/v1/models", r.headers
    # Bytes that are no UTF-8 stay as sent (they came back as the replacement character, R11).
    r = await client.get("/v1/models/%FF/")
    assert r.status_code == 307 and r.headers["location"] == "/v1/models/%FF", r.headers
    # A dot segment left once the slash is cut: a client would resolve it to another route
    # (/v2/models/clf/versions/..%2F went to the model's metadata; review R12): a 404.
    # Sent encoded or not (a re-encoded ".." had sent a client to another route too, R11).
    dots = ("/v2/models/clf/versions/..%2F", "/v1/models/.%2F")
    for sent in (*dots, "/v2/models/clf/versions/%2E%2E/ready%2F", "/v1/models/%2E%2F"):
        r = await client.get(sent)
        assert r.status_code == 404 and "location" not in r.headers, sent
    base = str(client.base_url).rstrip("/")
    for path in ("/nothing/", "//v1/models/", "/"):  # no route without the slash, or off-site
        r = await client.get(httpx.URL(base + path))
        assert r.status_code == 404 and "location" not in r.headers, path


async def test_predict_classification(client: httpx.AsyncClient) -> None:
    params = {"samples": 200, "seed": 7, "confidence": [0.8, 0.9]}
    body = {"instances": [ROW, [0, 0, 0, 0]], "parameters": params}
    r = await client.post("/v1/models/clf:predict", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    named = [dict(zip(["f0", "f1", "f2", "f3"], v, strict=True)) for v in (ROW, [0, 0, 0, 0])]
    by_name = await client.post(
        "/v1/models/clf:predict", json={"instances": named, "parameters": params}
    )
    assert by_name.json()["predictions"] == out["predictions"]
    assert out["model"]["name"] == "clf" and out["model"]["version"] == "1"
    assert out["backend"] == "torch" and out["device"] == "cpu"
    assert out["samples"] == 200 and out["seed"] == 7 and out["uncertainty_computed"]
    a, b = out["predictions"]
    assert a != b
    assert set(a["probabilities"]) == {"red", "green", "blue"}
    assert math.isclose(sum(a["probabilities"].values()), 1.0, rel_tol=1e-9)
    assert a["label"] == max(a["probabilities"], key=a["probabilities"].get)
    u = a["uncertainty"]
    assert u["mutual_information"] >= 0
    assert math.isclose(
        u["predictive_entropy"] - u["expected_entropy"], u["mutual_information"], abs_tol=1e-9
    )
    assert [iv["level"] for iv in a["intervals"]["red"]] == [0.8, 0.9]
    assert all(0 <= iv["lower"] <= iv["upper"] <= 1 for iv in a["intervals"]["blue"])


async def test_same_seed_replays_and_no_seed_reports_one(client: httpx.AsyncClient) -> None:
    body = {"instances": [ROW], "parameters": {"samples": 50, "seed": 11}}
    one = (await client.post("/v1/models/clf:predict", json=body)).json()
    two = (await client.post("/v1/models/clf:predict", json=body)).json()
    assert one["predictions"] == two["predictions"]
    fresh = (await client.post("/v1/models/clf:predict", json={"instances": [ROW]})).json()
    assert isinstance(fresh["seed"], int) and fresh["samples"] == 100
    replay = {"instances": [ROW], "parameters": {"seed": fresh["seed"]}}
    again = (await client.post("/v1/models/clf:predict", json=replay)).json()
    assert again["predictions"] == fresh["predictions"]


async def test_predict_regression(client: httpx.AsyncClient) -> None:
    body = {
        "instances": [[0.5, 0.1, -1.0]],
        "parameters": {"samples": 400, "seed": 1, "interval": "quantile", "confidence": 0.9},
    }
    out = (await client.post("/v1/models/reg:predict", json=body)).json()
    p = out["predictions"][0]
    assert p["aleatoric_std"] == pytest.approx(0.5)  # sqrt(noise_var = 0.25)
    assert p["std"] == pytest.approx(math.sqrt(p["epistemic_std"] ** 2 + 0.25))
    assert p["mc_standard_error"] == pytest.approx(p["epistemic_std"] / math.sqrt(399))
    (iv,) = p["intervals"]
    assert iv["method"] == "quantile" and iv["level"] == 0.9
    assert iv["lower"] < p["mean"] < iv["upper"]


async def test_classifier_intervals_are_honoured_or_refused(client: httpx.AsyncClient) -> None:
    # The metadata's default is the one a classifier answers with (it said gaussian).
    assert (await client.get("/v1/models/clf")).json()["defaults"]["interval"] == "quantile"
    url = "/v1/models/clf:predict"
    r = await client.post(url, json={"instances": [ROW], "parameters": {"interval": "gaussian"}})
    assert r.status_code == 422  # was 200 with "method": "quantile"
    assert r.json()["error"].startswith("interval=gaussian is for regressors: a classifier's")
    # Not asked for by name, a level the samples cannot reach is dropped, and the warning says
    # which level and how many samples it needs.
    body = {"instances": [ROW], "parameters": {"samples": 100, "confidence": [0.9, 0.99]}}
    r = await client.post(url, json=body)
    assert r.status_code == 200, r.text
    assert [iv["level"] for iv in r.json()["predictions"][0]["intervals"]["red"]] == [0.9]
    assert [iv["method"] for iv in r.json()["predictions"][0]["intervals"]["red"]] == ["quantile"]
    assert r.json()["warnings"] == [
        "per-class intervals omitted at 0.99 (needs samples >= 200); got samples=100"
    ]
    body["parameters"]["samples"] = 200
    r = await client.post(url, json=body)
    assert r.status_code == 200 and r.json()["warnings"] == []


async def test_one_rule_for_numbers_in_strings(client: httpx.AsyncClient) -> None:
    # "59" was taken as 59 in an instance but refused as a parameter; null was "NaN"; an object
    # value gave no feature name. Numbers in strings are refused everywhere now.
    url = "/v1/models/clf:predict"
    named = {"f0": 0.1, "f1": "0.2", "f2": 0.3, "f3": 0.4}
    cases = [
        (
            [named],
            {},
            "instance 0, feature 'f1': the string '0.2' is not a number; send numbers unquoted",
        ),
        (
            [{**named, "f1": None}],
            {},
            "instance 0, feature 'f1': null is not a number; send a value",
        ),
        (
            [[0.1, None, 0.3, 0.4]],
            {},
            "instance 0, feature 'f1': null is not a number; send a value",
        ),
        ([{**named, "f1": {"v": 1}}], {}, "instance 0, feature 'f1': dict is not a number"),
    ]
    for instances, params, message in cases:
        r = await client.post(url, json={"instances": instances, "parameters": params})
        assert r.status_code == 422 and r.json()["error"] == message, r.text
    for params in ({"confidence": "0.9"}, {"confidence": ["0.9"]}, {"timeout_ms": "50"}):
        r = await client.post(url, json={"instances": [ROW], "parameters": params})
        assert r.status_code == 422, (params, r.text)
        (key,) = params
        assert f"parameters.{key}" in r.json()["error"]
    # A deadline must be finite (1e400 parses as infinity: it meant no deadline), and however
    # small, it is one (5e-324 ms rounded to 0 s was read as none: 200).
    raw = b'{"instances": [[0.1, -0.2, 0.3, 0.4]], "parameters": {"timeout_ms": 1e400}}'
    r = await client.post(url, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422 and "parameters.timeout_ms" in r.json()["error"], r.text
    r = await client.post(url, json={"instances": [ROW], "parameters": {"timeout_ms": 5e-324}})
    assert r.status_code == 504, r.text


async def test_deterministic_mode(client: httpx.AsyncClient) -> None:
    body = {"instances": [ROW], "parameters": {"mode": "deterministic"}}
    out = (await client.post("/v1/models/clf:predict", json=body)).json()
    assert out["backend"] == "onnxruntime" and out["uncertainty_computed"] is False
    assert out["samples"] is None and out["seed"] is None
    assert "no uncertainty was computed" in out["warnings"][0]
    assert set(out["predictions"][0]) == {"label", "probabilities"}
    reg = await client.post(
        "/v1/models/reg:predict",
        json={"instances": [[1, 2, 3]], "parameters": {"mode": "deterministic"}},
    )
    assert set(reg.json()["predictions"][0]) == {"mean"}


BAD = [
    ({"instances": [[1, 2, 3]]}, 422, "instance 0 has shape [3], expected [4]"),
    (
        {"instances": [ROW, {"f0": 1}]},
        422,
        "instances mix objects and arrays; send all as arrays or all as objects",
    ),
    (
        {"instances": [{"f0": 1, "f1": 2, "f2": 3}]},
        422,
        "instance 0: missing ['f3'] feature(s); expected exactly ['f0', 'f1', 'f2', 'f3']",
    ),
    (
        {"instances": [{"f0": 1, "f1": 2, "f2": 3, "f3": 4, "zz": 1}]},
        422,
        "instance 0: unknown ['zz'] feature(s); expected exactly ['f0', 'f1', 'f2', 'f3']",
    ),
    (
        {"instances": [[1, 2, "x", 4]]},
        422,
        "instance 0, feature 'f2': the string 'x' is not a number; send numbers unquoted",
    ),
    (  # a value is echoed cut: a megabyte string once came back whole in the error
        {"instances": [[1, 2, "y" * 10_000, 4]]},
        422,
        f"instance 0, feature 'f2': the string {'y' * 40!r}... (10000 characters) is not a "
        "number; send numbers unquoted",
    ),
    (  # a bare string is no feature's value: it was blamed on the first feature
        {"instances": ["x" * 10_000]},
        422,
        f"instance 0 is the string {'x' * 40!r}... (10000 characters), not an array; this "
        "model takes an array of numbers of shape [4] or an object keyed by its feature names",
    ),
    (
        {"instances": [[1, 2, True, 4]]},
        422,
        "instance 0, feature 'f2': true/false are not accepted; send a number",
    ),
    (
        {"instances": [ROW, [1, 2, 3, 11]]},
        422,
        "instance 1, feature 'f3' = 11 is outside the valid range [-10, 10]; check the value and "
        "its unit",
    ),
    (
        {"instances": [[-11, 2, 3, 4]]},
        422,
        "instance 0, feature 'f0' = -11 is outside the valid range [-10, 10] cm; check the value "
        "and its unit",
    ),
    (
        {"instances": []},
        422,
        "invalid request: instances: List should have at least 1 item after validation, not 0",
    ),
    (
        {"instances": [ROW], "parameters": {"samples": 1}},
        422,
        "invalid request: parameters.samples: Input should be greater than or equal to 2",
    ),
    (
        {"instances": [ROW], "parameters": {"samples": "100"}},
        422,
        'invalid request: parameters.samples: Input should be a valid integer or "auto"',
    ),
    (
        {"instances": [ROW], "parameters": {"samples": 5000}},
        422,
        "samples=5000 is over the maximum of 1000 (setting max_samples)",
    ),
    (
        {"instances": [ROW, None]},
        422,
        "invalid request: instances: instance 1 is null: an instance is an array of the input "
        "shape, an object keyed by feature name, or for a text model a string (or "
        '{"text": "..."})',
    ),
    (
        {"instances": [ROW], "parameters": {"sample": 10}},
        422,
        "invalid request: parameters.sample: Extra inputs are not permitted (unknown key: "
        "check its spelling against the API reference)",
    ),
    (
        {"instances": [ROW], "parameters": {"confidence": 1.5}},
        422,
        "confidence level 1.5 is outside (0, 1); use e.g. 0.9 or 0.95, not 90 or 1",
    ),
    (
        {"instances": [ROW], "parameters": {"confidence": 0.9999999999999999}},
        422,
        "confidence level 0.9999999999999999 is too close to 1 for finite interval ends; use "
        "at most 0.999999",
    ),
    (
        {"instances": [ROW], "parameters": {"seed": -1}},
        422,
        "invalid request: parameters.seed: Input should be greater than or equal to 0",
    ),
    (
        {"instances": [ROW], "parameters": {"mode": "fast"}},
        422,
        "invalid request: parameters.mode: Input should be 'mc' or 'deterministic'",
    ),
    (
        {"instances": [ROW], "parameters": {"interval": "quantile", "confidence": 0.99}},
        422,
        "quantile intervals at 0.99 need samples >= 200 (got 100); ask for samples=200 or a "
        "lower confidence",
    ),
    (
        {"instances": [ROW], "parameters": {"interval": "conformal"}},
        422,
        "interval=conformal is for regressors: a classifier's per-class intervals are quantiles "
        "of its class probabilities over the passes (interval=quantile, the default); its "
        "conformal answer is the prediction_set, which a calibrated classifier always gives",
    ),
    (
        {"instances": [ROW] * 51},
        413,
        "51 instances in one request; the limit is 50 (setting max_instances): split the request",
    ),
]


@pytest.mark.parametrize("body, status, message", BAD)
async def test_bad_requests(
    client: httpx.AsyncClient, body: dict, status: int, message: str
) -> None:
    r = await client.post("/v1/models/clf:predict", json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"] == message
    assert r.json()["request_id"] == r.headers["x-request-id"]


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
async def test_nan_and_infinity(client: httpx.AsyncClient, literal: str) -> None:
    raw = b'{"instances": [[0.1, ' + literal.encode() + b", 0.3, 0.4]]}"
    r = await client.post(
        "/v1/models/clf:predict", content=raw, headers={"content-type": "application/json"}
    )
    assert r.status_code == 422
    assert r.json()["error"] == ("instance 0, feature 'f1': NaN and Infinity are not valid inputs")


async def test_malformed_json(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/models/clf:predict",
        content=b'{"instances": [',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 422
    assert r.json()["error"].endswith("(the body must be valid JSON)")


async def test_body_too_large(client: httpx.AsyncClient) -> None:
    body = orjson.dumps({"instances": [ROW] * 4000})
    r = await client.post(
        "/v1/models/clf:predict", content=body, headers={"content-type": "application/json"}
    )
    assert r.status_code == 413
    assert r.json()["error"] == (
        "request body is over 64000 bytes (setting max_body_bytes); "
        "send fewer instances per request, or ask the operator to raise MCSERVE_MAX_BODY_BYTES"
    )


async def test_request_id_echoed(client: httpx.AsyncClient) -> None:
    r = await client.get("/healthz", headers={"x-request-id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    r = await client.get("/healthz", headers={"x-request-id": "bad id with spaces"})
    generated = r.headers["x-request-id"]
    assert generated != "bad id with spaces"
    assert len(generated) == 32  # 16 hex of process prefix + 16 hex of counter


def test_to_array_shapes() -> None:
    from service.bundle.spec import InputSpec

    spec = InputSpec(shape=[2, 2], value_range=(0, 16))
    arr = to_array([[[0, 1], [2, 3]]], spec, 10)
    assert arr.dtype == np.float32 and arr.shape == (1, 2, 2)


@pytest.mark.parametrize(
    ("path", "body", "key"),
    [
        (
            "/v1/models/clf:predict",
            b'{"instances": [[0.1, -0.2, 0.3, 0.4]], "parameters": {"samples": 5, "samples": 7}}',
            "samples",
        ),
        (
            "/v1/models/clf:predict",
            b'{"instances": [[1, 2, 3, 4]], "instances": [[0, 0, 0, 0]]}',
            "instances",
        ),
        (
            "/v2/models/clf/infer",
            b'{"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", '
            b'"data": [1, 2, 3, 4], "data": [0, 0, 0, 0]}]}',
            "data",
        ),
        (
            "/v1/models/clf:predict",
            b'{"instances": [[1, 2, 3, 4]], "' + b"k" * 100 + b'": 1, "' + b"k" * 100 + b'": 2}',
            f"{'k' * 64}... (100 characters)",
        ),
    ],
)
async def test_a_key_repeated_in_an_object_is_refused(
    client: httpx.AsyncClient, path: str, body: bytes, key: str
) -> None:
    """The parser kept the last copy: `"samples": 5, "samples": 7` ran 7 passes, a second
    `instances` replaced the first, each with a 200 and no word."""
    r = await client.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code in (400, 422), r.text
    assert f"the key '{key}' appears twice in one object" in r.json()["error"]


@pytest.mark.parametrize("where", ["instance", "parameters", "top"])
async def test_a_long_key_is_cut_in_the_error(client: httpx.AsyncClient, where: str) -> None:
    """A 3 MB key was echoed whole, twice, into the answer (and into the access log); here 10 kB,
    under this app's body limit."""
    key = "k" * 10_000
    named = dict(zip(FEATURES, ROW, strict=True))
    body: dict[str, Any] = {"instances": [[*ROW]]}
    if where == "instance":
        body = {"instances": [{**named, key: 1}]}
    elif where == "parameters":
        body["parameters"] = {key: 1}
    else:
        body[key] = 1
    r = await client.post("/v1/models/clf:predict", json=body)
    assert r.status_code == 422 and len(r.content) < 2_000, r.text[:300]
    assert f"{'k' * 64}... (10000 characters)" in r.json()["error"]


async def test_many_problems_are_listed_up_to_a_bound(client: httpx.AsyncClient) -> None:
    body = {"instances": [ROW], "parameters": {f"k{i}": 1 for i in range(500)}}
    r = await client.post("/v1/models/clf:predict", json=body)
    details = r.json()["details"]
    assert r.status_code == 422 and len(details) == 21
    assert details[-1]["problem"] == "480 more problems not listed"


async def test_a_default_over_the_servers_maximum_says_whose_it_is(
    repo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With max_samples under a model's default, every request that sent no samples was told
    its (unsent) samples were too many; the start said nothing."""
    from apps import asgi_client, running

    from service.settings import Settings

    with caplog.at_level(logging.WARNING, logger="mcserve.lifecycle"):
        async with running(Settings(model_dir=repo, max_samples=10)) as app, asgi_client(app) as c:
            r = await c.post("/v1/models/clf:predict", json={"instances": [ROW]})
            ok = await c.post(
                "/v1/models/clf:predict", json={"instances": [ROW], "parameters": {"samples": 10}}
            )
    default = 100
    assert r.status_code == 422 and r.json()["error"] == (
        f"this model's default samples={default} is over the server's maximum of 10 (setting "
        "max_samples): send samples (at most 10), or ask the operator to raise "
        "MCSERVE_MAX_SAMPLES"
    )
    assert ok.status_code == 200
    assert any(
        rec.getMessage() == "model's default samples over max_samples"
        and getattr(rec, "model", None) == "clf"
        for rec in caplog.records
    )


async def test_a_queue_smaller_than_a_default_request_is_said_at_start(
    repo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """MCSERVE_MAX_QUEUE_ROWS under one instance's default passes: the server was ready and
    every default request a 413 telling the client to send less than the least it can."""
    from apps import asgi_client, running

    from service.settings import Settings

    settings = Settings(model_dir=repo, max_queue_rows=10)
    with caplog.at_level(logging.WARNING, logger="mcserve.lifecycle"):
        async with running(settings) as app, asgi_client(app) as c:
            r = await c.post("/v1/models/clf:predict", json={"instances": [ROW]})
    assert r.status_code == 413 and r.json()["error"].endswith(
        "send fewer instances or samples (max_samples), or raise the server's "
        "MCSERVE_MAX_QUEUE_ROWS"
    )
    assert any(
        rec.getMessage() == "model's default samples over max_queue_rows"
        and getattr(rec, "model", None) == "clf"
        for rec in caplog.records
    )


async def test_query_parameters_and_accept_are_read_as_sent(client: httpx.AsyncClient) -> None:
    """`?samples=5` ran the default passes; `?subject=` without the FHIR Accept was dropped;
    `application/fhir+json;q=0` (a refusal) was read as asking for FHIR."""
    url, body = "/v1/models/clf:predict", {"instances": [ROW]}
    r = await client.post(url + "?samples=5", json=body)
    assert r.status_code == 422 and r.json()["error"].startswith(
        "unknown query parameter 'samples': the only one is subject"
    )
    r = await client.post(url + "?subject=Patient/1", json=body)
    assert r.status_code == 422 and r.json()["error"].startswith(
        "the query parameter subject is read only with Accept: application/fhir+json"
    )
    fhir = {"accept": "application/fhir+json"}  # a FHIR answer names its subject: which one?
    r = await client.post(url + "?subject=Patient/1&subject=Patient/2", json=body, headers=fhir)
    assert r.status_code == 422 and r.json()["error"] == (
        "the query parameter subject appears 2 times; send it once"
    )
    refused = {"accept": "application/json, application/fhir+json;q=0"}
    r = await client.post(url, json=body, headers=refused)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    r = await client.post(url, json=body, headers={"accept": "application/fhir+json"})
    assert r.status_code == 422 and "needs the query parameter subject" in r.json()["error"]


@pytest.mark.parametrize(
    ("accept", "fhir"),
    [
        ("", False),
        ("*/*", False),
        ("application/fhir+json", True),
        ("application/json, application/fhir+json", True),  # a tie: FHIR, which was named
        ("application/json, application/fhir+json;q=0", False),
        ("application/fhir+json;q=0.5, application/json", False),
        # json's own q is 0.1 (the most specific range), not */*'s 1 (was: plain JSON)
        ("application/fhir+json;q=0.5, application/json;q=0.1, */*", True),
        ("application/json;q=nan, application/fhir+json;q=0.5", True),  # nan is 0 (was 1)
        ("application/fhir+json;q=inf", False),
    ],
)
def test_accept_is_read_as_rfc_9110_says(accept: str, fhir: bool) -> None:
    from service.api.native.predict import wants_fhir

    assert wants_fhir(accept) is fhir
