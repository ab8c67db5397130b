"""What is recorded for every prediction, on every route, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import numpy as np
import orjson
import psycopg
import pytest
from audit_support import Backend, execute, fake_request, serving

from service.api.common import audit as api_audit
from service.api.common.auth import hash_key
from service.api.common.call import run
from service.audit.arrays import HMAC_PREFIX, inputs_hmac, key_id
from service.audit.replay import replay
from service.audit.sqlite import SqliteStore
from service.audit.store import SCHEMA_VERSION, StoreError
from service.engine.params import PredictParams
from service.settings import ApiKey

ROW = [0.1, -0.2, 0.3, 0.4]
KEY = "a key kept in the deployment's secret store"


async def test_native_record(backend: Backend, repo: Path) -> None:
    keys = [ApiKey(id="ward-7", sha256=hash_key("s3cret"))]
    async with serving(repo, api_keys=keys, **backend.settings) as (app, client):
        r = await client.post(
            "/v1/models/clf:predict",
            json={"instances": [ROW, [0, 0, 0, 0]], "parameters": {"samples": 40, "seed": 11}},
            headers={"Authorization": "Bearer s3cret", "X-Request-ID": "req-native-1"},
        )
        assert r.status_code == 200, r.text
        answer = r.json()
        assert await app.state.audit.flush(10)
        store = app.state.audit.store
        [rec] = store.find("req-native-1")
    assert rec.route == "/v1/models/{name}:predict"
    assert rec.caller == "ward-7"
    assert (rec.model, rec.version, rec.digest) == ("clf", "1", answer["model"]["digest"])
    assert (rec.backend, rec.device, rec.mode) == ("torch", "cpu", "mc")
    assert rec.samples == 40 and rec.seed == 11
    assert rec.params["seed_given"] and rec.params["confidence"] == [0.95]
    assert rec.params["referral_policy"]["level"] == 0.95
    assert rec.n_inputs == 2
    x = rec.inputs
    assert x is not None and x.dtype == np.float32
    assert x.tolist() == np.asarray([ROW, [0, 0, 0, 0]], dtype=np.float32).tolist()
    assert rec.inputs_hmac is None  # no key configured
    # The summary is the JSON the client got, byte for byte in its canonical form.
    assert orjson.loads(rec.summary) == answer
    decisions = [
        {k: p["referral"][k] for k in ("refer", "triggers")} for p in answer["predictions"]
    ]
    assert rec.referral == decisions
    assert rec.referred == any(p["referral"]["refer"] for p in answer["predictions"])
    assert rec.card_uuid is None
    assert rec.software["torch"] and rec.software["threads"] >= 1
    assert (rec.recorded_at.utcoffset() or 0) == 0 or rec.recorded_at.tzinfo is not None


async def test_oip_and_deterministic_records(backend: Backend, repo: Path) -> None:
    async with serving(repo, **backend.settings) as (app, client):
        meta = (await client.get("/v2/models/reg")).json()
        name = meta["inputs"][0]["name"]
        body = {
            "inputs": [{"name": name, "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}],
            "parameters": {"samples": 30},
        }
        r = await client.post("/v2/models/reg/infer", json=body, headers={"X-Request-ID": "oip"})
        assert r.status_code == 200, r.text
        drawn = r.json()["parameters"]["seed"]
        det = {"instances": [ROW], "parameters": {"mode": "deterministic"}}
        r2 = await client.post("/v1/models/clf:predict", json=det, headers={"X-Request-ID": "d"})
        assert r2.status_code == 200, r2.text
        assert await app.state.audit.flush(10)
        store = app.state.audit.store
        [oip] = store.find("oip")
        [d] = store.find("d")
        assert store.count() == 2
    assert oip.route == "/v2/models/{name}/infer" and oip.caller is None
    assert oip.seed == drawn and not oip.params["seed_given"]  # a drawn seed is recorded
    assert oip.inputs is not None
    assert oip.inputs.tolist() == [[1.0, 2.0, 3.0]]  # type: ignore[union-attr]
    assert d.mode == "deterministic" and d.seed is None and d.referral is None
    assert d.backend == "onnxruntime"


async def test_hmac_only_inputs(backend: Backend, repo: Path) -> None:
    settings = {"audit_inputs": "hmac", "audit_hmac_key": KEY, **backend.settings}
    async with serving(repo, **settings) as (app, client):
        r = await client.post(
            "/v1/models/clf:predict",
            json={"instances": [ROW], "parameters": {"seed": 5}},
            headers={"X-Request-ID": "h"},
        )
        assert r.status_code == 200
        assert await app.state.audit.flush(10)
        [rec] = app.state.audit.store.find("h")
    assert rec.inputs is None and rec.inputs is None
    x = np.asarray([ROW], dtype=np.float32)
    assert rec.inputs_hmac == inputs_hmac(KEY.encode(), x)
    assert rec.inputs_hmac is not None and rec.inputs_hmac.startswith(HMAC_PREFIX)
    assert rec.inputs_key_id == key_id(KEY.encode())
    assert KEY not in rec.inputs_hmac and str(ROW[0]) not in rec.summary.split('"predictions"')[0]


async def test_hmac_mode_without_key_refuses_to_start(repo: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="audit_hmac_key"):
        async with serving(repo, audit_inputs="hmac", audit_path=tmp_path / "a.db"):
            pass


async def test_cds_hook_card_and_feedback(backend: Backend, repo: Path) -> None:
    """The CDS adapter calls `run(..., card_uuid=...)` and `record_all(...)` of feedback."""
    async with serving(repo, **backend.settings) as (app, _):
        st = app.state.mcserve
        batcher = st.batcher("reg", None)
        req = fake_request(app, "/cds-services/{id}", "cds-1", "https://ehr.example.org")
        x = np.asarray([[0.5, 0.5, 0.5]], dtype=np.float32)
        pred = await run(req, batcher, x, PredictParams(20, (0.9,), seed=3), None, card_uuid="c-1")
        assert pred.seed == 3
        fb = fake_request(app, "/cds-services/{id}/feedback", "cds-2", "https://ehr.example.org")
        event = api_audit.feedback_event(
            fb,
            "c-1",
            "overridden",
            override_reason={"reason": {"code": "not-relevant"}, "userComment": "seen"},
            outcome_timestamp="2026-01-01T10:00:00Z",
            service_id="risk",
        )
        api_audit.record_all(fb, [event])
        assert await app.state.audit.flush(10)
        store = app.state.audit.store
        [rec] = store.find("cds-1")
        [feedback] = store.feedback("c-1")
        assert store.count("audit_feedback") == 1
    assert rec.card_uuid == "c-1" and rec.caller == "https://ehr.example.org"
    assert rec.route == "/cds-services/{id}"
    assert feedback["outcome"] == "overridden" and feedback["service_id"] == "risk"
    assert orjson.loads(feedback["override_reason"])["userComment"] == "seen"
    assert feedback["request_id"] == "cds-2" and feedback["caller"] == "https://ehr.example.org"


async def test_flush_on_shutdown_loses_nothing(backend: Backend, repo: Path) -> None:
    n = 60
    async with serving(repo, **backend.settings) as (_, client):

        async def one(i: int) -> int:
            body = {"instances": [[i / n, 0, 0, 0]], "parameters": {"samples": 10}}
            r = await client.post("/v1/models/clf:predict", json=body)
            return r.status_code

        codes = await asyncio.gather(*(one(i) for i in range(n)))
        assert codes == [200] * n
        # No flush here: leaving the lifespan must write out whatever is still queued.
    with backend.open() as store:
        assert store.count() == n


async def test_off_records_nothing(repo: Path, tmp_path: Path) -> None:
    async with serving(repo, audit=False, audit_path=tmp_path / "off.db") as (app, client):
        r = await client.post("/v1/models/clf:predict", json={"instances": [ROW]})
        assert r.status_code == 200
        assert app.state.audit is None
    assert not (tmp_path / "off.db").exists()


async def test_append_only_and_schema_version(backend: Backend, repo: Path) -> None:
    async with serving(repo, **backend.settings) as (app, client):
        r = await client.post("/v1/models/clf:predict", json={"instances": [ROW]})
        assert r.status_code == 200
        fb = fake_request(app, "/cds-services/{id}/feedback", "f", "iss")
        api_audit.record_all(fb, [api_audit.feedback_event(fb, "card", "accepted")])
    with backend.open() as store:
        assert store.count() == 1 and store.count("audit_feedback") == 1
        assert store.migrate() == SCHEMA_VERSION
        assert store.migrate() == SCHEMA_VERSION  # idempotent
    errors: tuple[type[Exception], ...] = (sqlite3.DatabaseError, psycopg.Error)
    for sql in (
        "UPDATE audit_records SET summary = 'x'",
        "DELETE FROM audit_records",
        "DELETE FROM audit_feedback",
        "UPDATE audit_feedback SET outcome = 'accepted'",
    ):
        with pytest.raises(errors, match="append-only"):
            execute(backend, sql)
    assert execute(backend, "SELECT MAX(version) FROM audit_schema_version") == SCHEMA_VERSION


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    with SqliteStore(path) as store:
        store.migrate()
        store.conn.execute("INSERT INTO audit_schema_version VALUES (99, 'later')")
    with SqliteStore(path) as store, pytest.raises(StoreError, match="newer than this mcserve"):
        store.migrate()


async def test_recorded_answer_is_the_answer_sent_warnings_included(
    backend: Backend, repo: Path
) -> None:
    """The record encodes the answer once and the reply reuses that encoding: a warning the
    adapter added after the record was made (parameters that deterministic mode ignores) was
    missing from both the record and, with the audit on, the reply."""
    body = {"instances": [ROW], "parameters": {"mode": "deterministic", "samples": 10}}
    ignored = "mode=deterministic ignores samples: dropout is off, one pass is run"
    async with serving(repo, **backend.settings) as (app, client):
        r = await client.post("/v1/models/clf:predict", json=body, headers={"X-Request-ID": "w"})
        assert r.status_code == 200, r.text
        assert await app.state.audit.flush(10)
        [rec] = app.state.audit.store.find("w")
    assert r.json()["warnings"][0] == ignored
    assert rec.summary.encode() == r.content  # the record is the answer sent, byte for byte
    assert rec.params["adapter_warnings"] == [ignored]
    assert replay(rec, repo).identical  # the replay adds the adapter's warning again
    async with serving(repo, audit=False) as (_, client):
        off = await client.post("/v1/models/clf:predict", json=body)
    assert off.json()["warnings"] == r.json()["warnings"]  # the audit changes no answer


async def test_a_v2_record_keeps_the_warnings_its_answer_carried(
    backend: Backend, repo: Path
) -> None:
    """/v2 added its ignored-parameter warnings after the record was made: the record lacked
    them."""
    tensor = {"name": "input", "shape": [1, 4], "datatype": "FP32", "data": ROW}
    body = {"inputs": [tensor], "parameters": {"mode": "deterministic", "samples": 10}}
    ignored = "mode=deterministic ignores samples: dropout is off, one pass is run"
    async with serving(repo, **backend.settings) as (app, client):
        r = await client.post("/v2/models/clf/infer", json=body, headers={"X-Request-ID": "v2"})
        assert r.status_code == 200, r.text
        assert await app.state.audit.flush(10)
        [rec] = app.state.audit.store.find("v2")
    note = "deterministic mode: dropout off, no uncertainty was computed"  # as /v1 says
    assert r.json()["parameters"]["warnings"] == f"{ignored}; {note}"
    assert rec.params["adapter_warnings"] == [ignored]
    assert ignored in json.loads(rec.summary)["warnings"]
    assert replay(rec, repo).identical
