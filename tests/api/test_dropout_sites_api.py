"""`dropout_sites` on the native and Open Inference Protocol routes (issue 20, item 3): which
dropout sites a request samples, shown in the metadata, named in the answer, refused when out
of range with the range in the message."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

ROW = [0.1, -0.2, 0.3, 0.4]
ALLOWED = "'all' or k with 1 <= k <= 2 (the last k sites in graph order)"


def v2_body(**parameters: Any) -> dict[str, Any]:
    tensor = {"name": "input", "shape": [1, 4], "datatype": "FP32", "data": ROW}
    return {"inputs": [tensor], "parameters": {"seed": 3, "samples": 40, **parameters}}


async def test_metadata_shows_the_setting(client: httpx.AsyncClient) -> None:
    want = {"dropout_sites": "all", "sites": 2, "allowed": ALLOWED}
    assert (await client.get("/v1/models/clf")).json()["mc"] == want
    assert (await client.get("/v2/models/clf")).json()["parameters"] == want


async def test_native_override_is_named_and_replays(client: httpx.AsyncClient) -> None:
    url = "/v1/models/clf:predict"

    async def ask(**params: Any) -> dict[str, Any]:
        body = {"instances": [ROW], "parameters": {"samples": 40, "seed": 3, **params}}
        r = await client.post(url, json=body)
        assert r.status_code == 200, r.text
        return r.json()

    default, every, last = await ask(), await ask(dropout_sites="all"), await ask(dropout_sites=1)
    assert default["dropout_sites"] == every["dropout_sites"] == "all"
    assert last["dropout_sites"] == 1
    assert default["predictions"] == every["predictions"]
    assert last["predictions"] != every["predictions"]  # another setting, other samples
    assert (await ask(dropout_sites=1))["predictions"] == last["predictions"]  # same seed
    assert (await ask(dropout_sites=2))["dropout_sites"] == "all"  # k = every site
    det = await ask(mode="deterministic", dropout_sites=1, samples=None, seed=None)
    assert det["dropout_sites"] is None
    assert "ignores dropout_sites" in " ".join(det["warnings"])


@pytest.mark.parametrize("bad", [0, 3, -1])
async def test_native_out_of_range_is_a_422_with_the_range(
    client: httpx.AsyncClient, bad: int
) -> None:
    body = {"instances": [ROW], "parameters": {"dropout_sites": bad}}
    r = await client.post("/v1/models/clf:predict", json=body)
    assert r.status_code == 422
    assert r.json()["error"] == (
        "dropout_sites must be 'all' or an integer k with 1 <= k <= 2 (the last k of the "
        f"model's 2 dropout sites), got {bad}"
    )


@pytest.mark.parametrize("bad", ["some", "1", True, 1.0, {"last": 1}])
async def test_native_wrong_type_is_a_422(client: httpx.AsyncClient, bad: Any) -> None:
    body = {"instances": [ROW], "parameters": {"dropout_sites": bad}}
    r = await client.post("/v1/models/clf:predict", json=body)
    assert r.status_code == 422, r.text
    assert "parameters.dropout_sites" in r.json()["error"]


async def test_v2_override_is_named_and_refused_out_of_range(client: httpx.AsyncClient) -> None:
    url = "/v2/models/clf/infer"
    r = await client.post(url, json=v2_body(dropout_sites=1))
    assert r.status_code == 200, r.text
    assert r.json()["parameters"]["dropout_sites"] == 1
    every = (await client.post(url, json=v2_body())).json()
    assert every["parameters"]["dropout_sites"] == "all"
    assert every["outputs"] != r.json()["outputs"]
    bad = await client.post(url, json=v2_body(dropout_sites=5))
    assert bad.status_code == 400
    assert "1 <= k <= 2" in bad.json()["error"] and "got 5" in bad.json()["error"]
    wrong = await client.post(url, json=v2_body(dropout_sites="half"))
    assert wrong.status_code == 400 and "dropout_sites" in wrong.json()["error"]
