"""An audio model served from WAV files: /v1 `{"b64": ...}` instances and /v2 BYTES tensors (JSON
base64 and the binary extension, as tritonclient writes it), each clip's length and cut in the
answer, the same answer alone or beside other clips, and what cannot be read refused with a 4xx
that names the clip."""

from __future__ import annotations

import base64
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
import pytest_asyncio
import tritonclient.http as triton
from apps import asgi_client, running
from audio_nets import AUDIO, save_audio_model, tone, wav

from service.api.oip import schemas
from service.settings import Settings

URL = "/v1/models/tones:predict"
SECONDS = AUDIO.seconds  # 0.496 s: a 0.5 s clip is cut by 32 samples


@pytest.fixture(scope="module")
def audio_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("audiorepo")
    save_audio_model(root)
    save_audio_model(root, name="tones-any", resample=True)  # other rates resampled to 8 kHz
    return root


@pytest_asyncio.fixture(scope="module")
async def client(audio_repo: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(model_dir=audio_repo, compute_process=False)
    async with running(settings) as app, asgi_client(app) as c:
        yield c


def b64(raw: bytes) -> dict[str, str]:
    return {"b64": base64.b64encode(raw).decode()}


def _body(instances: list[Any], **params: Any) -> dict[str, Any]:
    return {"instances": instances, "parameters": {"samples": 16, "seed": 5, **params}}


CLIPS = [wav(tone(400.0, 0.3)), wav(tone(2500.0, 0.4), dtype="float32"), wav(tone(300.0, 2.0))]


async def test_wav_files_in_uncertainty_out(client: httpx.AsyncClient) -> None:
    r = await client.post(URL, json=_body([b64(c) for c in CLIPS]))
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert [p["label"] for p in preds] == ["low", "high", "low"]  # what the tones are
    assert [p["seconds"] for p in preds] == [0.3, 0.4, 2.0]
    assert [p["truncated"] for p in preds] == [False, False, True]
    for p in preds:
        assert p["uncertainty"]["mutual_information"] >= 0.0
    # A clip alone, same seed: the same bytes (its features are its own, its masks keyed by
    # the seed, the pass and its row).
    alone = await client.post(URL, json=_body([b64(CLIPS[0])]))
    assert alone.json()["predictions"][0] == preds[0]


async def test_metadata_shows_the_front_end(client: httpx.AsyncClient) -> None:
    meta = (await client.get("/v1/models/tones")).json()
    assert meta["inputs"]["audio"]["sample_rate"] == 8000
    assert meta["inputs"]["shape"] == [AUDIO.n_mels, AUDIO.frames]
    v2 = (await client.get("/v2/models/tones")).json()
    assert v2["inputs"] == [{"name": "input", "datatype": "BYTES", "shape": [-1]}]


@pytest.mark.parametrize(
    ("instance", "status", "says"),
    [
        ("a string", 422, 'an audio instance is {"b64": "<the WAV file in base64>"}'),
        ({"b64": "%%%"}, 422, "not valid base64"),
        (b64(wav(tone(400.0), rate=16000)), 422, "sampled at 16000 Hz; this model reads 8000"),
        (b64(b"ID3" + bytes(100)), 422, "is an MP3 file, not a WAV file"),
        (b64(bytes(200)), 422, "is not a WAV file"),
    ],
)
async def test_a_clip_that_cannot_be_read_is_refused_by_its_index(
    client: httpx.AsyncClient, instance: Any, status: int, says: str
) -> None:
    r = await client.post(URL, json=_body([b64(CLIPS[0]), instance]))
    assert r.status_code == status, r.text
    assert r.json()["error"].startswith("instance 1: ") and says in r.json()["error"]


async def test_the_default_clip_limit_fits_the_default_body_limit(
    client: httpx.AsyncClient,
) -> None:
    """The default max_audio_bytes (10 MB then) could not be sent: in base64 it is over the
    default 8 MiB body, refused by a 413 that said to send fewer instances."""
    meta = (await client.get("/v1/models/tones")).json()
    limit = meta["inputs"]["audio"]["max_audio_bytes"]
    n = (limit - 44) // 2  # 16-bit mono samples in a file of the limit
    clip = wav(np.full(n, 0.1) * np.sin(np.arange(n) * 0.3))
    assert limit - 2 <= len(clip) <= limit
    r = await client.post(URL, json=_body([b64(clip)]))
    assert r.status_code == 200, r.text[:300]
    assert r.json()["predictions"][0]["truncated"] is True


async def test_v2_featurises_off_the_event_loop(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1,024 tiny WAV files are a 51 kB body, under the bytes that send a body to a thread, but
    each is featurised at the model's length: it ran on the event loop (1.7 s for a 10 s
    model). By the clips' padded features, it is a thread's work."""
    from service.api.oip import infer

    threads, original = [], infer.audio_batch

    def watched(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.current_thread() is threading.main_thread())
        return original(*args, **kwargs)

    monkeypatch.setattr(infer, "audio_batch", watched)
    tiny = wav(np.zeros(2))
    inp = triton.InferInput("input", [64], "BYTES")
    inp.set_data_from_numpy(np.array([tiny] * 64, dtype=np.object_), binary_data=True)
    body, header = triton.InferenceServerClient.generate_request_body([inp])
    assert len(body) < 64 * 1024  # small: the bytes alone would keep it on the loop
    headers = {"Inference-Header-Content-Length": str(header)}
    r = await client.post("/v2/models/tones/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    assert threads == [False]


async def test_a_clip_over_the_size_limit_is_a_413_before_it_is_decoded(
    audio_repo: Path,
) -> None:
    settings = Settings(model_dir=audio_repo, compute_process=False, max_body_bytes=64 << 20)
    async with running(settings) as app, asgi_client(app) as c:
        big = {"b64": "A" * 14_000_000}
        r = await c.post(URL, json=_body([big]))
    assert r.status_code == 413, r.text
    assert "the audio is 10500000 bytes, over this model's limit of 6000000" in r.json()["error"]


def _tensor(data: list[Any] | None = None, **extra: Any) -> dict[str, Any]:
    n = len(data) if data is not None else 2
    return {"name": "input", "shape": [n], "datatype": "BYTES", "data": data, **extra}


@pytest.mark.parametrize("mode", ["mc", "deterministic"])
async def test_v2_json_takes_base64_clips(client: httpx.AsyncClient, mode: str) -> None:
    data = [b64(c)["b64"] for c in CLIPS]
    body = {"inputs": [_tensor(data)], "parameters": {"seed": 5, "samples": 16, "mode": mode}}
    r = await client.post("/v2/models/tones/infer", json=body)
    assert r.status_code == 200, r.text
    schemas.InferResponse.model_validate(r.json())
    outputs = {o["name"]: o for o in r.json()["outputs"]}
    assert outputs["seconds"]["data"] == [0.3, 0.4, 2.0]
    assert outputs["truncated"]["data"] == [False, False, True]
    assert outputs["sample_rate"]["data"] == [8000, 8000, 8000]
    assert outputs["seconds"]["datatype"] == "FP64"
    assert outputs["sample_rate"]["datatype"] == "INT64"
    # Outputs in the order they came: sample_rate (2026-12-07) after truncated, since a client
    # may read them by position.
    assert [o["name"] for o in r.json()["outputs"]][-3:] == ["seconds", "truncated", "sample_rate"]
    v1 = (await client.post(URL, json=_body([b64(c) for c in CLIPS], mode=mode))).json()
    labels = [["low", "high"].index(p["label"]) for p in v1["predictions"]]
    assert outputs["label"]["data"] == labels
    assert ("mutual_information" in outputs) == (mode == "mc")


async def test_v2_binary_clips_as_tritonclient_writes_them(client: httpx.AsyncClient) -> None:
    inp = triton.InferInput("input", [len(CLIPS)], "BYTES")
    inp.set_data_from_numpy(np.array(CLIPS, dtype=np.object_), binary_data=True)
    wanted = [triton.InferRequestedOutput("probabilities", binary_data=False)]
    body, header = triton.InferenceServerClient.generate_request_body(
        [inp], outputs=wanted, parameters={"seed": 5, "samples": 16}
    )
    headers = {"Inference-Header-Content-Length": str(header)}
    r = await client.post("/v2/models/tones/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    got = {o["name"]: o["data"] for o in orjson.loads(r.content)["outputs"]}
    v1 = (await client.post(URL, json=_body([b64(c) for c in CLIPS]))).json()["predictions"]
    want = [p["probabilities"][k] for p in v1 for k in ("low", "high")]
    assert got["probabilities"] == want  # the same bytes of audio, the same answer


async def test_v2_refusals_say_clips(client: httpx.AsyncClient) -> None:
    body = {"inputs": [{"name": "input", "shape": [1], "datatype": "FP32", "data": [1.0]}]}
    r = await client.post("/v2/models/tones/infer", json=body)
    assert r.status_code == 400
    assert "this is an audio model; send datatype BYTES (WAV files)" in r.json()["error"]
    r = await client.post("/v2/models/tones/infer", json={"inputs": [_tensor([7, 8])]})
    assert "data element 0 is int, not a string: send each WAV file in base64" in r.json()["error"]
    r = await client.post("/v2/models/tones/infer", json={"inputs": [_tensor(["AAAA"])]})
    assert r.json()["error"].startswith("input 'input', element 0: the audio is not a WAV file")


async def test_a_fhir_answer_says_the_clip_was_cut(client: httpx.AsyncClient) -> None:
    r = await client.post(
        URL,
        params={"subject": "Patient/p1"},
        json=_body([b64(CLIPS[2]), b64(CLIPS[0])]),
        headers={"accept": "application/fhir+json"},
    )
    assert r.status_code == 200, r.text
    said = [str(e["resource"].get("note", "")) for e in r.json()["entry"]]
    assert f"cut to its first {SECONDS:g} of 2 seconds" in said[0], said
    assert "cut to" not in said[1]


async def test_tiny_clips_are_counted_as_the_full_clips_they_are_padded_to(
    audio_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1,024 one-sample WAV files (a 79 kB body) were each padded to the model's length and
    featurised: 16 s and 3 GB for a 10 s model, and a 164 MB audit record (review G). A request
    holds at most the clips its body limit holds at the model's length in their smallest form,
    refused before any is read; full clips that fit the body are never refused (review I)."""
    from service.engine import clips as audio

    featurised: list[int] = []
    original = audio.encode_audio

    def counted(clips: Any, *args: Any) -> Any:
        featurised.append(len(clips))
        return original(clips, *args)

    monkeypatch.setattr(audio, "encode_audio", counted)
    body_limit = 400_000
    most = audio.clip_limit(AUDIO, body_limit)
    assert most == body_limit // (4 + 44 + AUDIO.samples)  # 8-bit mono WAVs in /v2's binary
    settings = Settings(model_dir=audio_repo, compute_process=False, max_body_bytes=body_limit)
    tiny = wav(np.zeros(1))

    def binary(clips: list[bytes]) -> tuple[bytes, dict[str, str]]:
        inp = triton.InferInput("input", [len(clips)], "BYTES")
        inp.set_data_from_numpy(np.array(clips, dtype=np.object_), binary_data=True)
        body, header = triton.InferenceServerClient.generate_request_body([inp])
        return body, {"Inference-Header-Content-Length": str(header)}

    async with running(settings) as app, asgi_client(app) as c:
        r = await c.post(URL, json=_body([b64(tiny)] * (most + 1)))
        assert r.status_code == 413, r.text[:300]
        assert r.json()["error"].startswith(
            f"{most + 1} clips in one request; this model takes at most {most}"
        )
        body, headers = binary([tiny] * (most + 1))
        r = await c.post("/v2/models/tones/infer", content=body, headers=headers)
        assert r.status_code == 413 and "clips in one request" in r.json()["error"], r.text[:300]
        assert featurised == []  # refused before any clip was read
        # As many full-length 8-bit clips as the body holds: answered.
        full = wav(tone(400.0, AUDIO.seconds), dtype="uint8")
        body, headers = binary([full] * most)
        assert len(body) <= body_limit
        r = await c.post("/v2/models/tones/infer", content=body, headers=headers)
        assert r.status_code == 200, r.text[:300]
        assert featurised == [most]


async def test_the_page_and_the_openapi_document_say_what_an_audio_model_takes(
    audio_repo: Path, client: httpx.AsyncClient
) -> None:
    """The page allowed a file of max_audio_bytes whatever the body limit (its base64 is a third
    larger: a 413 saying "send fewer instances"), and /v2's schema said BYTES were text."""
    schema = (await client.get("/openapi.json")).text
    assert "for audio models WAV files (base64 in JSON data, raw in the binary extension)" in schema
    page = (await client.get("/models/tones")).text
    assert 'data-max-bytes="6000000"' in page  # the model's limit: its base64 fits 8 MiB
    settings = Settings(model_dir=audio_repo, compute_process=False, max_body_bytes=1 << 20)
    async with running(settings) as app, asgi_client(app) as c:
        small = (await c.get("/models/tones")).text
    assert f'data-max-bytes="{((1 << 20) - 256) * 3 // 4}"' in small


async def test_a_model_that_resamples_takes_other_rates_and_says_so(
    client: httpx.AsyncClient,
) -> None:
    """`inputs.audio.resample`: a 16 kHz or 44.1 kHz tone to an 8 kHz model is what the 8 kHz
    tone is (the resampler keeps what is under 4 kHz), and every answer names the file's rate."""
    at_8k = [wav(tone(f, 0.3)) for f in (400.0, 2500.0)]
    other = [wav(tone(400.0, 0.3, 16000), rate=16000), wav(tone(2500.0, 0.3, 44100), rate=44100)]
    url = "/v1/models/tones-any:predict"
    r = await client.post(url, json=_body([b64(c) for c in at_8k + other]))
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert [p["label"] for p in preds] == ["low", "high", "low", "high"]
    assert [p["sample_rate"] for p in preds] == [8000, 8000, 16000, 44100]
    assert [p["seconds"] for p in preds] == [0.3] * 4
    for same, resampled in ((preds[0], preds[2]), (preds[1], preds[3])):
        for label, prob in same["probabilities"].items():
            assert abs(resampled["probabilities"][label] - prob) < 0.05
    data = [b64(c)["b64"] for c in other]
    body = {"inputs": [_tensor(data)], "parameters": {"seed": 5, "samples": 16}}
    v2 = await client.post("/v2/models/tones-any/infer", json=body)
    outputs = {o["name"]: o for o in v2.json()["outputs"]}
    assert outputs["sample_rate"]["data"] == [16000, 44100]
    fhir = await client.post(
        f"{url}?subject=Patient/p1",
        json=_body([b64(other[1])]),
        headers={"accept": "application/fhir+json"},
    )
    notes = [n["text"] for n in fhir.json()["note"]]
    assert "The clip was resampled from 44100 Hz to the model's 8000 Hz." in notes
    # The model that does not resample refuses the same file, saying how to convert it.
    r = await client.post(URL, json=_body([b64(other[1])]))
    assert r.status_code == 422
    assert r.json()["error"].endswith("-ac 1 OUT.wav); this model does not resample")
