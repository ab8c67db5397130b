"""A token-id model (int64 inputs, no tokenizer) through /v2: its metadata declared FP32 and an
INT64 request, as a Triton user sends ids, was a 400 (ids came only as floats)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import numpy as np
import pytest_asyncio
import torch
from apps import asgi_client, running
from text_nets import TextCNN, token_batch

from service.packaging import save
from service.settings import Settings


@pytest_asyncio.fixture(scope="module")
async def client(tmp_path_factory: object) -> AsyncIterator[httpx.AsyncClient]:
    root = tmp_path_factory.mktemp("tokrepo")  # type: ignore[attr-defined]
    torch.manual_seed(0)
    model = TextCNN().eval()
    labels = [f"c{i}" for i in range(model.fc.out_features)]
    save(model, token_batch(), out_dir=root, name="tok", version="1", task="classification",
         intended_use="tests only", labels=labels)  # fmt: skip
    settings = Settings(model_dir=root, compute_process=False)
    async with running(settings) as app, asgi_client(app) as c:
        yield c


def _tensor(ids: np.ndarray, datatype: str, binary: bool = False) -> dict[str, object]:
    t: dict[str, object] = {"name": "input", "shape": list(ids.shape), "datatype": datatype}
    if binary:
        t["parameters"] = {"binary_data_size": ids.nbytes}
    else:
        t["data"] = ids.ravel().tolist()
    return t


async def test_ids_as_int64_int32_and_floats_agree(client: httpx.AsyncClient) -> None:
    meta = (await client.get("/v2/models/tok")).json()
    assert meta["inputs"][0]["datatype"] == "INT64"
    ids = token_batch(2, seed=3).numpy().astype(np.int64)
    params = {"samples": 8, "seed": 1}
    answers = []
    for datatype in ("INT64", "INT32", "FP32"):
        body = {"inputs": [_tensor(ids, datatype)], "parameters": params}
        r = await client.post("/v2/models/tok/infer", json=body)
        assert r.status_code == 200, (datatype, r.text)
        answers.append(r.json()["outputs"])
    head = {"inputs": [_tensor(ids, "INT64", binary=True)], "parameters": params}
    raw = httpx.Request("POST", "/", json=head).content
    r = await client.post(
        "/v2/models/tok/infer",
        content=raw + ids.astype("<i8").tobytes(),
        headers={"inference-header-content-length": str(len(raw))},
    )
    assert r.status_code == 200, r.text
    answers.append(r.json()["outputs"])
    assert all(a == answers[0] for a in answers[1:])
    half = {"inputs": [_tensor(ids.astype(np.float64) + 0.5, "FP64")], "parameters": params}
    r = await client.post("/v2/models/tok/infer", json=half)
    assert r.status_code == 400 and "token ids are whole numbers" in r.json()["error"], r.text
