"""Replays: bit-identical from the record, a tampered summary caught, HMAC-only inputs checked."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from audit_support import Backend, execute, serving
from typer.testing import CliRunner

from service.audit.compare import size
from service.audit.replay import ReplayError, replay
from service.audit.rows import AuditRecord
from service.audit.seal import context, reveal, seal
from service.cli import app as cli

ROOT = Path(__file__).resolve().parents[2]
ROW = [0.1, -0.2, 0.3, 0.4]
KEY = "replay-test-key"


async def record_some(backend: Backend, repo: Path, **settings: object) -> dict[str, AuditRecord]:
    """Several predictions at once (so they share batches), on both routes and both modes."""
    requests = {
        "clf-seeded": ("/v1/models/clf:predict", {"instances": [ROW, [1, 1, 1, 1]],
                                                    "parameters": {"seed": 3, "samples": 64}}),
        "clf-drawn": ("/v1/models/clf:predict", {"instances": [ROW]}),
        "reg-quantile": ("/v1/models/reg:predict", {"instances": [[0.2, 0.1, -1]],
                         "parameters": {"interval": "quantile", "samples": 200,
                                        "confidence": [0.8, 0.9]}}),
        "reg-det": ("/v1/models/reg:predict", {"instances": [[0.2, 0.1, -1]],
                    "parameters": {"mode": "deterministic"}}),
    }  # fmt: skip
    async with serving(repo, **backend.settings, **settings) as (app, client):
        meta = (await client.get("/v2/models/reg")).json()
        oip = {
            "inputs": [
                {"name": meta["inputs"][0]["name"], "shape": [2, 3], "datatype": "FP32",
                 "data": [0.5, 0.25, 1, -2, 0, 3]}
            ],
            "parameters": {"samples": 50},
        }  # fmt: skip
        requests["reg-oip"] = ("/v2/models/reg/infer", oip)
        rs = await asyncio.gather(
            *(client.post(url, json=body, headers={"X-Request-ID": rid})
              for rid, (url, body) in requests.items())
        )  # fmt: skip
        assert [r.status_code for r in rs] == [200] * len(rs), [r.text for r in rs]
        assert await app.state.audit.flush(10)
        store = app.state.audit.store
        return {rid: store.find(rid)[0] for rid in requests}


async def test_replay_is_bit_identical(backend: Backend, repo: Path) -> None:
    records = await record_some(backend, repo)
    for rid, rec in records.items():
        result = replay(rec, repo)
        assert result.identical, (rid, result.differences)
        assert result.recomputed == rec.summary
        assert result.notes == []


async def test_replay_after_tampering_reports_the_mismatch(backend: Backend, repo: Path) -> None:
    records = await record_some(backend, repo)
    rec = records["clf-seeded"]
    doc = orjson.loads(rec.summary)
    doc["predictions"][1]["probabilities"]["red"] += 1e-12  # a last-bits change
    forged = orjson.dumps(doc).decode().replace("'", "''")
    # The triggers refuse edits; a tamperer with the owner's rights drops them first.
    if backend.name == "sqlite":
        execute(backend, "DROP TRIGGER audit_records_no_update")
    else:
        execute(backend, "DROP TRIGGER audit_records_append_only ON audit_records")
    execute(backend, f"UPDATE audit_records SET summary = '{forged}' WHERE id = {rec.id}")
    with backend.open() as store:
        [tampered] = store.find(str(rec.id))
    result = replay(tampered, repo)
    assert not result.identical
    assert len(result.differences) == 1
    assert result.differences[0].startswith("$.predictions[1].probabilities.red: stored ")


async def test_replay_reports_tampered_derived_columns(backend: Backend, repo: Path) -> None:
    """`referral`, `referred` and `n_inputs` are made from the answer when it is recorded; one
    changed while the answer was left alone passed as bit-identical (only `summary` was
    compared). An input outside the training range is referred."""
    async with serving(repo, **backend.settings) as (app, client):
        body = {"instances": [[9.0, 9.0, 9.0, 9.0], ROW], "parameters": {"seed": 1}}
        r = await client.post("/v1/models/clf:predict", json=body)
        assert r.status_code == 200 and r.json()["predictions"][0]["referral"]["refer"]
        assert await app.state.audit.flush(10)
        [rec] = app.state.audit.store.find(r.headers["x-request-id"])
    assert rec.referred is True and replay(rec, repo).identical
    if backend.name == "sqlite":
        execute(backend, "DROP TRIGGER audit_records_no_update")
    else:
        execute(backend, "DROP TRIGGER audit_records_append_only ON audit_records")
    calm = '[{"refer":false,"triggers":[]},{"refer":false,"triggers":[]}]'
    execute(backend, f"UPDATE audit_records SET referred = false, referral = '{calm}'")
    with backend.open() as store:
        tampered = store.get(rec.id)
    assert tampered is not None and tampered.summary == rec.summary  # the answer is untouched
    result = replay(tampered, repo)
    assert not result.identical and result.recomputed == rec.summary
    assert [d.split(":")[0] for d in result.differences] == ["column referral", "column referred"]
    assert result.differences[1] == "column referred: stored false, the answer gives true"
    execute(backend, "UPDATE audit_records SET n_inputs = 1")
    with backend.open() as store:
        fewer = store.get(rec.id)
    assert fewer is not None
    assert replay(fewer, repo).differences[-1] == "column n_inputs: stored 1, the answer gives 2"


async def test_replay_hmac_only(backend: Backend, repo: Path, tmp_path: Path) -> None:
    settings = {"audit_inputs": "hmac", "audit_hmac_key": KEY}
    rec = (await record_some(backend, repo, **settings))["clf-seeded"]
    assert rec.inputs is None
    key = KEY.encode()
    with pytest.raises(ReplayError, match="supply them"):
        replay(rec, repo, hmac_key=key)
    named = [dict(zip(["f0", "f1", "f2", "f3"], r, strict=True)) for r in (ROW, [1, 1, 1, 1])]
    good = tmp_path / "inputs.json"
    good.write_bytes(orjson.dumps({"instances": named}))  # named features: the same array
    assert replay(rec, repo, inputs=good, hmac_key=key).identical
    wrong = tmp_path / "wrong.json"
    wrong.write_bytes(orjson.dumps([ROW, [1, 1, 1, 1.0000001]]))
    with pytest.raises(ReplayError, match="do not match the record's HMAC"):
        replay(rec, repo, inputs=wrong, hmac_key=key)
    with pytest.raises(ReplayError, match="key id"):
        replay(rec, repo, inputs=good, hmac_key=b"another key")
    with pytest.raises(ReplayError, match="MCSERVE_AUDIT_HMAC_KEY"):
        replay(rec, repo, inputs=good)


async def test_replay_refuses_a_changed_bundle(repo: Path, tmp_path: Path) -> None:
    backend = Backend("sqlite", {"audit_path": tmp_path / "a.db"})
    rec = (await record_some(backend, repo))["clf-drawn"]
    with pytest.raises(ReplayError, match="not in"):
        replay(rec, tmp_path)
    forged = AuditRecord(**{**rec.__dict__, "digest": "sha256:" + "0" * 64})
    with pytest.raises(ReplayError, match="immutable"):
        replay(forged, repo)


async def test_cli_show_and_replay(
    backend: Backend, repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = {"audit_inputs": "hmac", "audit_hmac_key": KEY}
    records = await record_some(backend, repo, **settings)
    for k, v in backend.settings.items():
        monkeypatch.setenv(f"MCSERVE_{k.upper()}", str(v))
    monkeypatch.setenv("MCSERVE_MODEL_DIR", str(repo))
    monkeypatch.setenv("MCSERVE_AUDIT_HMAC_KEY", KEY)
    runner = CliRunner()
    rec = records["reg-oip"]
    shown = runner.invoke(cli, ["audit", "show", "reg-oip"])
    assert shown.exit_code == 0, shown.output
    doc = orjson.loads(shown.stdout)
    assert doc["id"] == rec.id and doc["route"] == "/v2/models/{name}/infer"
    assert doc["inputs"] is None and doc["inputs_hmac"] == rec.inputs_hmac
    assert doc["summary"] == orjson.loads(reveal(rec, KEY.encode()).summary)
    missing = runner.invoke(cli, ["audit", "show", "nope"])
    assert missing.exit_code == 2 and "no audit record" in missing.stderr

    inputs = tmp_path / "oip.json"
    inputs.write_bytes(orjson.dumps([[0.5, 0.25, 1], [-2, 0, 3]]))
    ok = runner.invoke(cli, ["audit", "replay", str(rec.id), "--inputs", str(inputs)])
    assert ok.exit_code == 0, ok.output
    assert ok.stdout.startswith(f"bit-identical: record {rec.id} (reg 1, torch on cpu, seed ")
    no_inputs = runner.invoke(cli, ["audit", "replay", str(rec.id)])
    assert no_inputs.exit_code == 2 and "--inputs FILE" in no_inputs.stderr

    target = records["reg-det"]
    doc = orjson.loads(reveal(target, KEY.encode()).summary)
    doc["predictions"][0]["mean"] = 0.0
    # The answer is sealed under the key: a tamperer without it cannot forge one (see
    # test_audit_hmac); this one has the key, so the replay must catch the changed number.
    t = target
    assert t.inputs_hmac is not None
    bound = context(t.inputs_hmac, t.request_id, t.model, t.version, t.digest, t.mode)
    forged = seal(KEY.encode(), None, orjson.dumps(doc), bound)
    if backend.name == "sqlite":
        execute(backend, "DROP TRIGGER audit_records_no_update")
    else:
        execute(backend, "DROP TRIGGER audit_records_append_only ON audit_records")
    execute(backend, f"UPDATE audit_records SET summary = '{forged}' WHERE id = {target.id}")
    det_inputs = tmp_path / "det.json"
    det_inputs.write_bytes(orjson.dumps([[0.2, 0.1, -1]]))
    bad = runner.invoke(cli, ["audit", "replay", "reg-det", "--inputs", str(det_inputs)])
    assert bad.exit_code == 1, bad.output
    assert bad.stdout.startswith(f"DIFFERENT: record {target.id} (reg 1, onnxruntime on cpu)")
    assert "$.predictions[0].mean: stored 0.0, recomputed " in bad.stdout


async def test_replay_names_an_engine_numerics_the_record_lacks(repo: Path, tmp_path: Path) -> None:
    # A record from before the engine numbered its arithmetic (2026-11-27: the prefix rewrites
    # changed last bits) has no such key: the replay's notes must say so, not stay silent.
    backend = Backend("sqlite", {"audit_path": tmp_path / "a.db"})
    rec = (await record_some(backend, repo))["clf-seeded"]
    assert rec.software["engine_numerics"] >= 2
    older = {k: v for k, v in rec.software.items() if k != "engine_numerics"}
    result = replay(AuditRecord(**{**rec.__dict__, "software": older}), repo)
    assert result.identical  # same engine here: the same bits
    assert result.notes == [
        f"engine_numerics: recorded None, here {rec.software['engine_numerics']}"
    ]


def test_size_of_differences_tells_rounding_from_values() -> None:
    stored = {"predictions": [{"mean": 1.0, "std": 0.5, "label": "red", "probabilities": [0.25]}]}
    rounding = {"predictions": [{"mean": 1.0 + 2e-7, "std": 0.5, "label": "red",
                                 "probabilities": [0.25 - 1e-8]}]}  # fmt: skip
    small = size(stored, rounding)
    assert (small.numbers, small.other) == (2, 0) and small.rounding_only
    assert small.largest == pytest.approx(2e-7) and small.relative == pytest.approx(2e-7)
    assert "float rounding only" in small.describe() and "replayed on " in small.describe()
    moved = size(stored, {"predictions": [{**rounding["predictions"][0], "mean": 1.01}]})
    assert not moved.rounding_only and moved.relative == pytest.approx(0.01 / 1.01)
    assert "beyond float rounding" in moved.describe()
    relabelled = size(stored, {"predictions": [{**stored["predictions"][0], "label": "blue"}]})
    assert (relabelled.numbers, relabelled.other) == (0, 1) and not relabelled.rounding_only


async def test_replay_under_other_cpu_kernels_reports_the_size(repo: Path, tmp_path: Path) -> None:
    # A replay on a machine whose libraries take other kernels (here forced: MKL's SSE2 path,
    # ATen without vectors) gives other last bits: the CLI must say so, with the size, and call it
    # rounding, never pass it as identical or leave it unexplained.
    db = tmp_path / "a.db"
    backend = Backend("sqlite", {"audit_path": db})
    rec = (await record_some(backend, repo))["clf-seeded"]
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "MKL_CBWR": "COMPATIBLE",
        "ATEN_CPU_CAPABILITY": "default",
    }
    cmd = [sys.executable, "-m", "service", "audit", "replay", str(rec.id), "--path", str(db)]
    cmd += ["--model-dir", str(repo)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"DIFFERENT: record {rec.id} (clf 1, torch on cpu, seed 3)")
    assert lines[1].startswith("size: ") and "float rounding only" in lines[1], proc.stdout
    assert all(line.startswith(("  $.predictions[", "  ... and ")) for line in lines[2:]), (
        proc.stdout
    )
