"""samples="auto" over real HTTP (issue 22, item 4): a real server process (compute process on,
as deployed) with a two-class model whose easy input is settled by the first chunk and whose
hard input (a fair coin per pass) never is; /v1 with httpx, /v2 with tritonclient."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as triton
from nets import coin_net
from server import Server, serve
from tritonclient.utils import InferenceServerException

from service.engine.summaries import min_samples_for_quantile
from service.packaging import save

pytestmark = pytest.mark.slow
EASY, HARD, MAX = [10.0], [0.0], 256
AUTO = {"samples": "auto", "max_samples": MAX, "tolerance": 0.001}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    repo = tmp_path_factory.mktemp("adaptive-repo")
    save(coin_net(), torch.zeros(4, 1), out_dir=repo, name="coin", version="1",
         task="classification", intended_use="tests only", labels=["heads", "tails"])  # fmt: skip
    env = {"MCSERVE_COMPUTE_PROCESS": "true", "MCSERVE_MAX_SAMPLES": "1000"}
    with serve(tmp_path_factory.mktemp("adaptive-log"), model_dir=repo, env=env) as s:
        yield s


@pytest.fixture(scope="module")
def first(server: Server) -> int:
    """The first chunk: 32 passes, or what the default level's quantile intervals need, or a
    classifier's default passes (nothing of it settles before them)."""
    defaults = httpx.get(f"{server.url}/v1/models/coin").json()["defaults"]
    return max(32, min_samples_for_quantile(defaults["confidence"]), defaults["samples"])


def predict(server: Server, rows: list[list[float]], **params: Any) -> httpx.Response:
    body = {"instances": rows, "parameters": params}
    return httpx.post(f"{server.url}/v1/models/coin:predict", json=body, timeout=30)


def test_v1_same_seed_same_passes_and_bytes_equal_to_the_fixed_answer(
    server: Server, first: int
) -> None:
    a, b = (
        predict(server, [EASY, EASY], seed=7, **AUTO),
        predict(server, [EASY, EASY], seed=7, **AUTO),
    )
    assert a.status_code == 200, a.text
    assert a.content == b.content  # same seed: the same passes and the same bytes
    out = a.json()
    assert out["samples"] == first and [p["passes_used"] for p in out["predictions"]] == [first] * 2
    assert f"adaptive passes: {first} used" in out["warnings"][-1]
    fixed = predict(server, [EASY, EASY], seed=7, samples=first).json()
    assert "passes_used" not in fixed["predictions"][0]
    for row in out["predictions"]:
        del row["passes_used"]
    assert out["predictions"] == fixed["predictions"]  # the answer of a fixed request at T


async def test_v1_concurrent_easy_and_hard_requests_stop_independently(
    server: Server, first: int
) -> None:
    rows = [EASY, HARD, EASY, HARD, EASY, EASY]
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
        answers = await asyncio.gather(
            *(
                c.post("/v1/models/coin:predict",
                       json={"instances": [x], "parameters": {**AUTO, "seed": 20 + i}})
                for i, x in enumerate(rows)
            )
        )  # fmt: skip
    used = [r.json()["predictions"][0]["passes_used"] for r in answers]
    assert used == [first if x == EASY else MAX for x in rows]
    # One request's inputs share its passes (its answer is one fixed request's at that T).
    both = predict(server, [EASY, HARD], seed=5, **AUTO).json()
    assert [p["passes_used"] for p in both["predictions"]] == [MAX, MAX]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"samples": "auto", "max_samples": 5000}, "max_samples=5000 is over the server's maximum"),
        ({"samples": "auto", "tolerance": 0}, "greater than 0"),
        ({"samples": "auto", "tolerance": -0.1}, "greater than 0"),
        ({"samples": "auto", "tolerance": "small"}, "valid number"),
        ({"samples": "auto", "max_samples": 1}, "greater than or equal to 2"),
        ({"samples": "many"}, "auto"),
        ({"samples": 100, "tolerance": 0.01}, "apply to samples=auto only"),
    ],
)
def test_v1_bad_adaptive_values_are_422_with_the_fix(
    server: Server, params: dict[str, Any], message: str
) -> None:
    r = predict(server, [EASY], **params)
    assert r.status_code == 422, r.text
    assert message in r.text, r.text


def test_v1_a_small_max_samples_runs_what_it_allows(server: Server) -> None:
    """max_samples 2 to 31 was refused ("2 <= first (32) <= max_samples"), and a classifier's
    level needing more passes than max_samples was told to use gaussian intervals, which a
    classifier has not: it runs max_samples, its intervals at that level left out with a
    warning, as a fixed request's are."""
    for params in ({"max_samples": 16}, {"max_samples": 100, "confidence": 0.99}):
        r = predict(server, [HARD], seed=4, samples="auto", **params)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["predictions"][0]["passes_used"] == params["max_samples"]
        assert any(w.startswith("per-class intervals omitted at") for w in out["warnings"])


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    yield c
    c.close()


def infer(client: triton.InferenceServerClient, x: list[float], **params: Any) -> Any:
    inp = triton.InferInput("input", [1, 1], "FP32")
    inp.set_data_from_numpy(np.array([x], dtype=np.float32))
    return client.infer("coin", [inp], parameters=params)


def test_v2_tritonclient_passes_used_output_and_same_bytes(
    client: triton.InferenceServerClient, first: int
) -> None:
    easy, again = infer(client, EASY, seed=3, **AUTO), infer(client, EASY, seed=3, **AUTO)
    hard = infer(client, HARD, seed=3, **AUTO)
    assert easy.as_numpy("passes_used").tolist() == [first]
    assert hard.as_numpy("passes_used").tolist() == [MAX]
    assert hard.get_response()["parameters"]["samples"] == MAX
    for name in ("probabilities", "probability_std", "mutual_information", "label"):
        assert easy.as_numpy(name).tobytes() == again.as_numpy(name).tobytes()
    fixed = infer(client, EASY, seed=3, samples=first)
    assert fixed.as_numpy("passes_used") is None  # named only for samples=auto by default
    assert fixed.as_numpy("probabilities").tobytes() == easy.as_numpy("probabilities").tobytes()
    with pytest.raises(InferenceServerException, match="greater than 0"):
        infer(client, EASY, samples="auto", tolerance=0.0)
