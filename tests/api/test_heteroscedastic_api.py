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
from torch import nn

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
    torch.manual_seed(0)
    save(
        Passthrough(),
        torch.randn(4, 2),
        out_dir=root,
        name="passthrough",
        version="1",
        task="regression",
        intended_use="tests only",
        target="y",
        feature_names=["a", "v"],
        variance="log_variance",
    )
    return root


class Passthrough(nn.Module):
    """Mean from a dropout layer; log-variance = the input's feature `v`, as sent."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.drop, self.head = nn.Linear(2, 8), nn.Dropout(0.3), nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.head(self.drop(torch.relu(self.body(x)))), x[:, 1:2]], dim=1)


@pytest_asyncio.fixture(scope="module")
async def client(hetero_repo: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(model_dir=hetero_repo, required_models=["noisy", "passthrough"])
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


@pytest.mark.parametrize("samples", [50, "auto"])
async def test_an_overflowing_log_variance_is_a_clear_422(
    client: httpx.AsyncClient, samples: int | str
) -> None:
    """`samples: "auto"` let the head's ValueError through as a 500 (a fixed count was a 422)."""
    body = {"instances": [[0.1, 0.0], [0.1, 800.0]], "parameters": {"samples": samples}}
    r = await client.post("/v1/models/passthrough:predict", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"] == (
        "the log-variance head output 800 for input 1 overflows a variance (over 600); the "
        "model's noise head is unusable for that input"
    )
