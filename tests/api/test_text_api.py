"""A text model through /v1 (issue 20, items 6 and 7): strings in, uncertainty out, per-text
token counts, the same answer alone or beside other texts, and bad texts answered with a 4xx."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from apps import asgi_client, running
from text_nets import LENGTH, save_text_model

from service.api.oip import schemas
from service.settings import Settings

URL = "/v1/models/notes:predict"


@pytest.fixture(scope="module")
def text_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("textrepo")
    save_text_model(root)
    return root


@pytest_asyncio.fixture(scope="module")
async def client(text_repo: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(model_dir=text_repo, compute_process=False)
    async with running(settings) as app, asgi_client(app) as c:
        yield c


def _body(instances: list[Any], **params: Any) -> dict[str, Any]:
    return {"instances": instances, "parameters": {"samples": 16, "seed": 5, **params}}


async def test_texts_in_uncertainty_out(client: httpx.AsyncClient) -> None:
    long_text = " ".join(["chest pain"] * LENGTH)
    r = await client.post(URL, json=_body(["Chest pain", {"text": "acute stroke"}, long_text]))
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert [p["truncated"] for p in preds] == [False, False, True]
    assert preds[2]["tokens"] > LENGTH >= preds[0]["tokens"] > 0
    for p in preds:
        assert set(p["probabilities"]) == {"a", "b", "c"}
        assert p["uncertainty"]["mutual_information"] >= 0.0
    # The same request's first text alone, same seed: the same bytes (masks are keyed by the
    # seed, the pass and the row within the request, and every text has the same padded shape).
    alone = await client.post(URL, json=_body(["Chest pain"]))
    assert alone.json()["predictions"][0] == preds[0]


async def test_metadata_shows_the_tokenizer(client: httpx.AsyncClient) -> None:
    meta = (await client.get("/v1/models/notes")).json()
    text = meta["inputs"]["text"]
    assert text["tokenizer"] == "tokenizer.json"
    assert text["max_tokens"] == LENGTH and text["truncation"] == "truncate"


@pytest.mark.parametrize("mode", ["mc", "deterministic"])
async def test_v2_answers_per_text_counts_as_outputs(client: httpx.AsyncClient, mode: str) -> None:
    """They were lists in the response's parameters, which the protocol (and this server's own
    OpenAPI document) restricts to scalars: InferResponse refused the answer."""
    long_text = " ".join(["chest pain"] * LENGTH)
    tensor = {"name": "input", "shape": [2], "datatype": "BYTES", "data": ["Chest pain", long_text]}
    body = {"inputs": [tensor], "parameters": {"seed": 5, "samples": 16, "mode": mode}}
    r = await client.post("/v2/models/notes/infer", json=body)
    assert r.status_code == 200, r.text
    schemas.InferResponse.model_validate(r.json())
    outputs = {o["name"]: o for o in r.json()["outputs"]}
    assert outputs["truncated"]["data"] == [False, True]
    assert outputs["truncated"]["datatype"] == "BOOL" and outputs["tokens"]["datatype"] == "INT64"
    v1 = (await client.post(URL, json=_body(["Chest pain", long_text]))).json()["predictions"]
    assert outputs["tokens"]["data"] == [p["tokens"] for p in v1]
    assert "probabilities" in outputs and "label" in outputs  # label: in both modes
    assert ("mutual_information" in outputs) == (mode == "mc")


@pytest.mark.parametrize(
    ("instances", "status", "message"),
    [
        ([""], 422, "instance 0: the text is empty (or only whitespace)"),
        (["ok", "a\x00b"], 422, "instance 1: the text contains a NUL character"),
        (["ok", "\u200b\u0301"], 422, "instance 1: the text has no token this model reads"),
        ([[1, 2, 3]], 422, "instance 0: expected a string of text, got list"),
        (["x" * 100_001], 413, "instance 0: the text is 100001 bytes, over this model's limit"),
        # every token unknown (another script): an ordinary answer, referred by nothing
        (["ok", "Сердечная недостаточность"], 422, "instance 1: none of the text's"),
    ],
    ids=["empty", "nul", "no-token", "ids-as-list", "too-long", "all-unknown"],
)
async def test_bad_texts_are_4xx_with_the_fix(
    client: httpx.AsyncClient, instances: list[Any], status: int, message: str
) -> None:
    r = await client.post(URL, json=_body(instances))
    assert r.status_code == status, r.text
    assert r.json()["error"].startswith(message)


async def test_invalid_utf8_is_refused(client: httpx.AsyncClient) -> None:
    raw = b'{"instances": ["chest \xff pain"]}'
    r = await client.post(URL, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert "UTF-8" in r.json()["error"]


async def test_a_lone_surrogate_escape_says_what_it_is(client: httpx.AsyncClient) -> None:
    """The parser's own words, "unexpected end of hex escape", did not say what was wrong."""
    raw = b'{"instances": ["\\ud800 pain"]}'
    r = await client.post(URL, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert r.json()["error"].endswith(
        "(a \\ud800-\\udfff escape must be one half of a surrogate pair; a lone one is not "
        "Unicode: send the text as UTF-8, or escape whole characters)"
    )


async def test_a_text_s_own_commas_are_not_counted_as_json_values(text_repo: Path) -> None:
    """The body-cost check counted every `,` `[` `{`, those inside the texts too: a list of lab
    values was refused with 413 on /v1 and /v2 (one such text, with max_instances=1). Values
    outside the strings still are."""
    labs = "Serum values (mg/dL): " + ", ".join(f"{i % 10}.{i % 7}" for i in range(3000))
    v2 = {"inputs": [{"name": "input", "shape": [1], "datatype": "BYTES", "data": [labs]}]}
    settings = Settings(model_dir=text_repo, compute_process=False, max_instances=1)
    async with running(settings) as app, asgi_client(app) as c:
        r = await c.post(URL, json=_body([labs]))
        assert r.status_code == 200, r.text
        assert r.json()["predictions"][0]["truncated"] is True
        r = await c.post("/v2/models/notes/infer", json=v2)
        assert r.status_code == 200, r.text
        hostile = b'{"instances": [' + b"0," * 20_000 + b'"a text"]}'
        r = await c.post(URL, content=hostile, headers={"content-type": "application/json"})
        assert r.status_code == 413, r.text
        assert "more than 1 texts can need" in r.json()["error"]


async def test_large_texts_are_tokenized_off_the_event_loop(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/v1 chose by values only (texts x max_tokens): 9 texts of 100 kB were tokenized on the
    event loop, holding every other request 4.5 s; the body's bytes count too now."""
    import threading

    from service.api.native import predict

    seen: list[bool] = []
    encode = predict.encode_texts

    def recording(*args: Any, **kwargs: Any) -> Any:
        seen.append(threading.current_thread() is threading.main_thread())
        return encode(*args, **kwargs)

    monkeypatch.setattr(predict, "encode_texts", recording)
    big = " ".join(["chest pain"] * 9_000)  # 98,999 bytes
    assert (await client.post(URL, json=_body([big] * 2))).status_code == 200
    assert (await client.post(URL, json=_body(["Chest pain"]))).status_code == 200
    assert seen == [False, True]  # a small body converts faster than the hop: on the loop


async def test_v2_names_in_errors_are_cut(client: httpx.AsyncClient) -> None:
    """An unknown input's or output's 200 kB name came back whole in the error."""
    name = "n" * 200_000
    tensor = {"name": name, "shape": [1], "datatype": "BYTES", "data": ["chest pain"]}
    r = await client.post("/v2/models/notes/infer", json={"inputs": [tensor]})
    assert r.status_code == 400 and len(r.content) < 1000, len(r.content)
    tensor["name"] = "input"
    body = {"inputs": [tensor], "outputs": [{"name": name}]}
    r = await client.post("/v2/models/notes/infer", json=body)
    assert r.status_code == 400 and len(r.content) < 1000, len(r.content)


async def test_a_fhir_answer_says_the_text_was_cut(client: httpx.AsyncClient) -> None:
    """The JSON answer says `truncated`; the FHIR one said nothing of the unread text."""
    long_text = " ".join(["chest pain"] * LENGTH)
    r = await client.post(
        URL,
        params={"subject": "Patient/p1"},
        json=_body([long_text, "Chest pain"]),
        headers={"accept": "application/fhir+json"},
    )
    assert r.status_code == 200, r.text
    said = [str(e["resource"].get("note", "")) for e in r.json()["entry"]]
    assert f"cut to its first {LENGTH} of" in said[0] and "cut to" not in said[1], said


async def test_v2_text_errors_name_the_input_element(client: httpx.AsyncClient) -> None:
    """/v2 said "instance 1: ...", /v1's word, of a request that sent input 'input'."""
    tensor = {"name": "input", "shape": [2], "datatype": "BYTES", "data": ["ok", "a\x00b"]}
    r = await client.post("/v2/models/notes/infer", json={"inputs": [tensor]})
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "input 'input', element 1: the text contains a NUL character"
