"""`MCSERVE_AUDIT_INPUTS=hmac` keeps nothing that reveals or confirms an input, and the SQLite
file is the owner's alone (issue 27, finding 6)."""

from __future__ import annotations

import dataclasses
import os
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import psycopg
import pytest
from audit_support import Backend, serving
from psycopg.rows import dict_row

from service.audit.record import summary_json
from service.audit.replay import ReplayError, replay
from service.audit.seal import SEALED_PREFIX, reveal
from service.bundle.load import load_bundle
from service.engine.model import ServedModel
from service.engine.params import PredictParams

KEY = "hmac-test-key"
# f0 = 4.75 is outside clf's training range [-3, 3]: the referral reason would name the value.
ROW = [4.75, -0.2, 0.3, 0.4]


def raw_rows(backend: Backend) -> list[dict[str, Any]]:
    """Every stored column as the database holds it, read as anyone with read access would."""
    if backend.name == "sqlite":
        conn = sqlite3.connect(backend.settings["audit_path"])
        conn.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in conn.execute("SELECT * FROM audit_records ORDER BY id")]
        finally:
            conn.close()
    with psycopg.connect(backend.settings["audit_url"], row_factory=dict_row) as pg:
        return list(pg.execute("SELECT * FROM audit_records ORDER BY id").fetchall())


def numbers(doc: Any) -> set[str]:
    """Every float of a JSON document, as JSON writes it."""
    if isinstance(doc, dict):
        return set().union(*(numbers(v) for v in doc.values())) if doc else set()
    if isinstance(doc, list):
        return set().union(*(numbers(v) for v in doc)) if doc else set()
    return {orjson.dumps(doc).decode()} if isinstance(doc, float) else set()


async def record(backend: Backend, repo: Path) -> dict[str, Any]:
    """One MC prediction with a client seed and one deterministic, in hmac mode; the answers."""
    settings = {"audit_inputs": "hmac", "audit_hmac_key": KEY, **backend.settings}
    async with serving(repo, **settings) as (app, client):
        answers = {}
        for rid, params in (("mc", {"seed": 5, "samples": 32}), ("det", {"mode": "deterministic"})):
            r = await client.post(
                "/v1/models/clf:predict",
                json={"instances": [ROW], "parameters": params},
                headers={"X-Request-ID": rid},
            )
            assert r.status_code == 200, r.text
            answers[rid] = r.json()
        assert await app.state.audit.flush(10)
    return answers


async def test_hmac_record_holds_no_input_value_and_no_testable_answer(
    backend: Backend, repo: Path
) -> None:
    answers = await record(backend, repo)
    reason = answers["mc"]["predictions"][0]["referral"]["reasons"][0]
    assert "4.75" in reason  # what the client got names the value...
    rows = raw_rows(backend)
    assert len(rows) == 2
    stored = " ".join(str(v) for row in rows for v in row.values())
    assert "4.75" not in stored and "training range" not in stored  # ...the record does not
    mc, det = rows
    assert mc["inputs"] is None and mc["seed"] is None
    assert orjson.loads(mc["params"])["seed"] is None
    assert mc["summary"].startswith(SEALED_PREFIX) and det["summary"].startswith(SEALED_PREFIX)
    # what stays in clear for queries: the decision and its triggers, which name no value
    assert orjson.loads(mc["referral"]) == [{"refer": True, "triggers": ["extrapolation"]}]
    # An attacker with the public bundle guesses the right input, even knows the seed, and
    # recomputes both answers: none of their numbers is in the record to compare with.
    model = ServedModel(load_bundle(repo / "clf" / "1"), device="cpu")
    x = np.asarray([ROW], dtype=np.float32)
    for row, seed in ((mc, 5), (det, None)):
        p = orjson.loads(row["params"])  # in clear: samples, levels, mode, interval
        params = PredictParams(p["samples"], tuple(p["confidence"]), seed, p["mode"], p["interval"])
        pred = model.predict(x, params)
        guessed = numbers(orjson.loads(summary_json(model, pred))["predictions"])
        assert guessed and not {n for n in guessed if n in stored}


async def test_hmac_record_opens_with_the_key_only(
    backend: Backend, repo: Path, tmp_path: Path
) -> None:
    answers = await record(backend, repo)
    with backend.open() as store:
        [rec] = store.find("mc")
    opened = reveal(rec, KEY.encode())
    assert orjson.loads(opened.summary) == answers["mc"]
    assert opened.seed == 5 and opened.params["seed"] == 5
    inputs = tmp_path / "inputs.json"
    inputs.write_bytes(orjson.dumps([ROW]))
    assert replay(rec, repo, inputs=inputs, hmac_key=KEY.encode()).identical
    with pytest.raises(ReplayError, match="MCSERVE_AUDIT_HMAC_KEY"):
        replay(rec, repo, inputs=inputs)
    # A changed sealed answer, or one moved from another record, does not open.
    body = rec.summary.removeprefix(SEALED_PREFIX)
    flipped = body[:20] + ("A" if body[20] != "A" else "B") + body[21:]
    changed = dataclasses.replace(rec, summary=SEALED_PREFIX + flipped)
    with pytest.raises(ReplayError, match="does not open"):
        replay(changed, repo, inputs=inputs, hmac_key=KEY.encode())
    with backend.open() as store:
        [det] = store.find("det")
    moved = dataclasses.replace(rec, summary=det.summary)
    with pytest.raises(ReplayError, match="does not open"):
        replay(moved, repo, inputs=inputs, hmac_key=KEY.encode())


async def test_sqlite_files_are_the_owners_alone(repo: Path, tmp_path: Path) -> None:
    path = tmp_path / "store" / "audit.db"
    umask = os.umask(0o022)  # the usual umask: SQLite alone would create 0644 files
    try:
        async with serving(repo, audit_path=path) as (app, client):
            r = await client.post("/v1/models/clf:predict", json={"instances": [ROW]})
            assert r.status_code == 200
            assert await app.state.audit.flush(10)
            files = sorted(p.name for p in path.parent.iterdir())
            assert files == ["audit.db", "audit.db-shm", "audit.db-wal"]
            modes = {name: (path.parent / name).stat().st_mode & 0o777 for name in files}
    finally:
        os.umask(umask)
    assert modes == dict.fromkeys(files, 0o600)
