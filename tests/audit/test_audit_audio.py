"""Records of an audio model replay bit for bit: from the features stored (the clips' seconds
and cuts read from the recorded answer, as they are not in the features), and in HMAC mode
from the clips supplied, whose features are computed again and checked against the HMAC."""

from __future__ import annotations

import base64
import dataclasses
from pathlib import Path

import orjson
import pytest
from audio_nets import save_audio_model, tone, wav
from audit_support import Backend, serving

from service.audit.inputs import ReplayError
from service.audit.replay import replay

KEY = "audio-audit-key"
CLIPS = [{"b64": base64.b64encode(wav(tone(f, s))).decode()} for f, s in [(400, 0.3), (2500, 1.0)]]


@pytest.fixture(scope="module")
def audio_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("audiorepo")
    save_audio_model(root)
    return root


async def record(backend: Backend, repo: Path, **settings: object) -> bytes:
    body = {"instances": CLIPS, "parameters": {"samples": 16, "seed": 5}}
    async with serving(repo, **backend.settings, **settings) as (app, client):
        r = await client.post("/v1/models/tones:predict", json=body, headers={"X-Request-ID": "a"})
        assert r.status_code == 200, r.text
        assert [p["truncated"] for p in r.json()["predictions"]] == [False, True]
        assert await app.state.audit.flush(10)
    return r.content


async def test_an_audio_record_replays_from_its_features(
    backend: Backend, audio_repo: Path
) -> None:
    answer = await record(backend, audio_repo)
    with backend.open() as store:
        [rec] = store.find("a")
    assert rec.summary.encode() == answer
    assert rec.inputs is not None and rec.inputs.shape == (2, 16, 32)  # the features
    result = replay(rec, audio_repo)
    assert result.identical, result.differences


async def test_an_audio_record_replays_from_its_clips_in_hmac_mode(
    backend: Backend, audio_repo: Path, tmp_path: Path
) -> None:
    await record(backend, audio_repo, audit_inputs="hmac", audit_hmac_key=KEY)
    with backend.open() as store:
        [rec] = store.find("a")
    assert rec.inputs is None
    clips = tmp_path / "clips.json"
    clips.write_bytes(orjson.dumps({"instances": CLIPS}))
    result = replay(rec, audio_repo, inputs=clips, hmac_key=KEY.encode())
    assert result.identical, result.differences
    # As a /v2 client holds them, base64 strings, flat ([B]) or nested ([B, 1]): the same
    # clips (they were refused).
    for form in ([c["b64"] for c in CLIPS], [[c["b64"]] for c in CLIPS]):
        clips.write_bytes(orjson.dumps({"instances": form}))
        result = replay(rec, audio_repo, inputs=clips, hmac_key=KEY.encode())
        assert result.identical, result.differences
    # Another clip is not the recorded one: its features fail the HMAC.
    clips.write_bytes(orjson.dumps({"instances": [CLIPS[1], CLIPS[0]]}))
    with pytest.raises(ReplayError, match="do not match the record's HMAC"):
        replay(rec, audio_repo, inputs=clips, hmac_key=KEY.encode())


async def test_a_record_from_before_sample_rate_replays_from_its_clips(
    backend: Backend, audio_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Answers before 2026-12-07 gave no `sample_rate`: replayed from its clips, such a record
    was called different (review L). Recorded here by the server as it answered then."""
    from service.engine.audio import AudioBatch

    def as_before(self: AudioBatch) -> list[dict[str, object]]:
        pairs = zip(self.seconds, self.truncated, strict=True)
        return [{"seconds": s, "truncated": c} for s, c in pairs]

    with monkeypatch.context() as m:
        m.setattr(AudioBatch, "notes", as_before)
        answer = await record(backend, audio_repo, audit_inputs="hmac", audit_hmac_key=KEY)
    assert b"sample_rate" not in answer
    with backend.open() as store:
        [rec] = store.find("a")
    clips = tmp_path / "clips.json"
    clips.write_bytes(orjson.dumps({"instances": CLIPS}))
    result = replay(rec, audio_repo, inputs=clips, hmac_key=KEY.encode())
    assert result.identical, result.differences


async def test_a_record_that_lost_a_clips_length_is_a_difference(
    backend: Backend, audio_repo: Path, tmp_path: Path
) -> None:
    """The notes of a replay are read from the recorded answer (from stored features) or
    kept to its keys (from clips): a stored answer without `seconds` and `truncated` replayed
    as identical (review N). Only `sample_rate`, which older answers lack, may be absent."""
    await record(backend, audio_repo, audit_inputs="store")
    with backend.open() as store:
        [rec] = store.find("a")
    doc = orjson.loads(rec.summary)
    for p in doc["predictions"]:
        del p["seconds"], p["truncated"]
    lost = dataclasses.replace(rec, summary=orjson.dumps(doc).decode())
    clips = tmp_path / "clips.json"
    clips.write_bytes(orjson.dumps({"instances": CLIPS}))
    for result in (replay(lost, audio_repo), replay(lost, audio_repo, inputs=clips)):
        assert not result.identical
        assert "$.predictions[0].seconds: present in only one" in result.differences
