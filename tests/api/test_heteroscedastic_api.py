"""A learned-noise regressor through /v1 and /v2: the same mixture numbers in both."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import pytest_asyncio
import torch
from apps import asgi_client, running
from nets import mlp

from service.packaging import save
from service.settings import Settings

ROWS = [[0.5, -1.0, 2.0], [0.0, 0.3, -0.2]]


@pytest.fixture(scope="module")
def hetero_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hetero-repo")
    torch.manual_seed(0)
    save(
        mlp(0.25, d_in=3, hidden=16, d_out=2),
        torch.randn(4, 3),
        out_dir=root,
        name="noisy",
        version="1",
        task="regression",
        intended_use="tests only",
        target="y",
        target_unit="mmHg",
        variance="log_variance",
    )
    return root


@pytest_asyncio.fixture(scope="module")
async def client(hetero_repo: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(model_dir=hetero_repo, required_models=["noisy"])
    async with running(settings) as app, asgi_client(app) as c:
        yield c


async def test_v1_and_v2_carry_the_same_mixture_numbers(client: httpx.AsyncClient) -> None:
    params = {"samples": 100, "seed": 3, "confidence": 0.9, "interval": "quantile"}
    r1 = await client.post(
        "/v1/models/noisy:predict", json={"instances": ROWS, "parameters": params}
    )
    v1 = r1.json()
    flat = [v for row in ROWS for v in row]
    tensor = {"name": "input", "shape": [2, 3], "datatype": "FP32", "data": flat}
    r2 = await client.post(
        "/v2/models/noisy/infer", json={"inputs": [tensor], "parameters": params}
    )
    assert r2.status_code == 200, r2.text
    v2 = {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in r2.json()["outputs"]}
    for i, p in enumerate(v1["predictions"]):
        # A learned noise differs by input and is part of std: std^2 = epistemic^2 + aleatoric^2.
        assert p["aleatoric_std"] > 0
        assert p["std"] == pytest.approx(math.hypot(p["epistemic_std"], p["aleatoric_std"]))
        for name in ("mean", "std", "epistemic_std", "aleatoric_std", "mc_standard_error"):
            assert v2[name][i, 0] == p[name], name  # bit for bit: both FP64 from one summary
        (iv,) = p["intervals"]
        assert iv["method"] == "quantile"
        assert (v2["lower"][i, 0], v2["upper"][i, 0]) == (iv["lower"], iv["upper"])
    a, b = (pr["aleatoric_std"] for pr in v1["predictions"])
    assert a != b
    meta = (await client.get("/v1/models/noisy")).json()
    assert meta["aleatoric"]["kind"] == "heteroscedastic"
    assert meta["aleatoric"]["parameterisation"] == "log_variance"
    # Deterministic mode answers the mean head alone.
    det = {"instances": ROWS, "parameters": {"mode": "deterministic"}}
    out = (await client.post("/v1/models/noisy:predict", json=det)).json()
    assert [set(p) for p in out["predictions"]] == [{"mean"}, {"mean"}]
    tensor_det = {"inputs": [tensor], "parameters": {"mode": "deterministic"}}
    r = await client.post("/v2/models/noisy/infer", json=tensor_det)
    assert r.status_code == 200, r.text
    assert [o["shape"] for o in r.json()["outputs"]] == [[2, 1]]
