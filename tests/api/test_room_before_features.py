"""A full queue refuses a request before its inputs are featurised (the audio review's G4): a
WAV file is decoded and its log-mel features computed on a worker thread, for nothing when the
queue then answers 429. /v1 and /v2 alike; with room, the same request is answered. And the
featurising is timed, in the access log and the metrics (G5)."""

from __future__ import annotations

import asyncio
import base64
import logging
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_asyncio
from apps import asgi_client, running
from audio_nets import save_audio_model, tone, wav
from fastapi import FastAPI
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from text_nets import save_text_model

from service.api.native import predict as native_predict
from service.api.oip import infer as oip_infer
from service.engine.batcher import Batcher
from service.settings import Settings

CLIP = base64.b64encode(wav(tone(400.0, 0.3))).decode()
V1 = {"instances": [{"b64": CLIP}], "parameters": {"samples": 16, "seed": 1}}
V2 = {
    "inputs": [{"name": "input", "shape": [1], "datatype": "BYTES", "data": [CLIP]}],
    "parameters": {"samples": 16, "seed": 1},
}


@pytest_asyncio.fixture(scope="module")
async def app(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[FastAPI]:
    root = tmp_path_factory.mktemp("audio-room")
    save_audio_model(root)
    save_text_model(root)  # "notes"
    async with running(Settings(model_dir=root, compute_process=False)) as application:
        yield application


def _counted(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> list[int]:
    calls: list[int] = []
    real: Callable[..., Any] = getattr(module, name)

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counting)
    return calls


@pytest.mark.parametrize(
    ("path", "body", "module", "featurise"),
    [
        ("/v1/models/tones:predict", V1, native_predict, "audio_batch"),
        ("/v2/models/tones/infer", V2, oip_infer, "audio_batch"),
    ],
    ids=["v1", "v2"],
)
async def test_a_full_queue_refuses_before_featurising(
    app: FastAPI,
    monkeypatch: pytest.MonkeyPatch,
    path: str,
    body: dict[str, Any],
    module: Any,
    featurise: str,
) -> None:
    calls = _counted(monkeypatch, module, featurise)
    b: Batcher = app.state.mcserve.batchers[("tones", "1")]
    saved, b.max_queue_rows = b.max_queue_rows, 20  # one request of 16 rows fits, two do not
    gate = threading.Event()
    job = app.state.mcserve.executor.submit(gate.wait)  # the compute is busy: requests queue
    try:
        async with asgi_client(app) as c:
            first = asyncio.ensure_future(c.post(path, json=body))
            for _ in range(1000):
                if b.stats.queue_rows == 16:
                    break
                await asyncio.sleep(0.005)
            assert b.stats.queue_rows == 16 and calls == [1]
            # A request that is wrong in form is told so, not to retry (review K, D2).
            wrong = (
                {**body, "instances": [{"b64": 5}]}
                if path.startswith("/v1")
                else {**body, "inputs": [{**body["inputs"][0], "name": "WRONG"}]}
            )
            r = await c.post(path, json=wrong)
            assert r.status_code in (400, 422), r.text
            r = await c.post(path, json=body)
            assert r.status_code == 429, r.text
            assert (
                r.json()["error"] == "model 'tones' is at capacity; retry after the indicated delay"
            )
            assert int(r.headers["retry-after"]) >= 1
            assert calls == [1]  # the refused request's clip was never decoded
            gate.set()
            assert (await first).status_code == 200
            assert (await c.post(path, json=body)).status_code == 200  # room again
            assert calls == [1, 1]
    finally:
        gate.set()
        job.result()
        b.max_queue_rows = saved


@pytest.mark.parametrize(
    "path, body",
    [("/v1/models/tones:predict", V1), ("/v2/models/tones/infer", V2)],
    ids=["v1", "v2"],
)
async def test_featurising_is_timed_in_the_access_log_and_metrics(
    app: FastAPI, caplog: pytest.LogCaptureFixture, path: str, body: dict[str, Any]
) -> None:
    """G5: a WAV file's decoding and features were seen only as request time less queue and
    compute time."""
    caplog.set_level(logging.INFO, logger="mcserve.access")

    def count() -> float:
        scrape = generate_latest(app.state.metrics.registry).decode()
        return sum(
            s.value
            for family in text_string_to_metric_families(scrape)
            for s in family.samples
            if s.name == "mcserve_featurise_duration_seconds_count"
            and s.labels == {"model": "tones", "input": "audio"}
        )

    before = count()
    async with asgi_client(app) as c:
        r = await c.post(path, json=body)
    assert r.status_code == 200, r.text
    assert count() == before + 1
    (line,) = [rec for rec in caplog.records if rec.name == "mcserve.access"]
    took = line.__dict__["featurise_ms"]
    assert 0 < took < line.__dict__["duration_ms"]


NOT_WAV = base64.b64encode(b"ID3\x04 not a WAV file at all").decode()


@pytest.mark.parametrize(
    ("model", "path", "body", "status", "says"),
    [
        ("tones", "/v1/models/tones:predict", {"instances": [{"b64": "!!"}]}, 422, "base64"),
        ("tones", "/v1/models/tones:predict", {"instances": [{"b64": NOT_WAV}]}, 422, "MP3"),
        ("tones", "/v2/models/tones/infer", {"inputs": [{**V2["inputs"][0], "data": [NOT_WAV]}]},
         400, "MP3"),
        ("notes", "/v1/models/notes:predict", {"instances": ["  "]}, 422, "empty"),
        ("notes", "/v1/models/notes:predict", {"instances": ["a\u0000b"]}, 422, "NUL"),
        ("notes", "/v2/models/notes/infer",
         {"inputs": [{"name": "input", "shape": [1], "datatype": "BYTES", "data": [" "]}]},
         400, "empty"),
    ],
    ids=["v1-base64", "v1-not-wav", "v2-not-wav", "v1-blank-text", "v1-nul", "v2-blank-text"],
)  # fmt: skip
async def test_a_full_queue_still_says_what_is_wrong_with_an_input(
    app: FastAPI, model: str, path: str, body: dict[str, Any], status: int, says: str
) -> None:
    """What needs no decoding or tokenizer is checked before the queue's room: a malformed
    clip or text under a full queue was a 429, retried in vain (review M, R1)."""
    b: Batcher = app.state.mcserve.batchers[(model, "1")]
    saved, queued = b.max_queue_rows, b.stats.queue_rows
    if path.startswith("/v1"):
        fine = V1 if model == "tones" else {"instances": ["a note"]}
    else:
        fine = V2 if model == "tones" else {"inputs": [{**body["inputs"][0], "data": ["a note"]}]}
    b.max_queue_rows, b.stats.queue_rows = 20, 20  # full: a request of 16 rows would fit empty
    try:
        async with asgi_client(app) as c:
            r = await c.post(path, json={**body, "parameters": {"samples": 16}})
            assert r.status_code == status, r.text
            assert says in r.json()["error"]
            r = await c.post(path, json={**fine, "parameters": {"samples": 16}})
            assert r.status_code == 429, r.text  # the same request, well formed
    finally:
        b.max_queue_rows, b.stats.queue_rows = saved, queued
