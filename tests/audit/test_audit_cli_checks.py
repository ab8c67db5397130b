"""What `audit replay` and `audit show` vouch for, and which store they read: a column the answer
names (seed, samples, mode, backend, device, model version) changed by the database owner is
DIFFERENT, never "bit-identical" printing the changed value; a store of another schema version,
or without a column this code reads, is a one-line exit-2 failure (it was a traceback with exit
1, which means DIFFERENT); `--path` wins over MCSERVE_AUDIT_URL (it was ignored: the live store's
record of that id was read)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import orjson
import pytest
from audit_support import Backend, execute, serving
from typer.testing import CliRunner

from service.audit.compare import derived
from service.audit.rows import AuditRecord
from service.cli import app as cli

ROW = [0.1, -0.2, 0.3, 0.4]
BODY = {"instances": [ROW], "parameters": {"seed": 5, "samples": 40}}
KEY = "checks-test-key"


async def _record(backend: Backend, repo: Path, **settings: object) -> AuditRecord:
    async with serving(repo, **backend.settings, **settings) as (app, client):
        r = await client.post("/v1/models/clf:predict", json=BODY)
        assert r.status_code == 200, r.text
        assert await app.state.audit.flush(10)
        [rec] = app.state.audit.store.find(r.headers["x-request-id"])
    return rec


def _editable(backend: Backend) -> None:
    """The triggers refuse edits; a tamperer with the owner's rights drops them first."""
    if backend.name == "sqlite":
        execute(backend, "DROP TRIGGER audit_records_no_update")
    else:
        execute(backend, "DROP TRIGGER audit_records_append_only ON audit_records")


def _env(backend: Backend, monkeypatch: pytest.MonkeyPatch, repo: Path) -> None:
    for k, v in backend.settings.items():
        monkeypatch.setenv(f"MCSERVE_{k.upper()}", str(v))
    monkeypatch.setenv("MCSERVE_MODEL_DIR", str(repo))


async def test_replay_names_changed_answer_columns(
    backend: Backend, repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only referral, referred and n_inputs were checked: these edits replayed (from `params`)
    as "bit-identical: record 1 (clf 1, onnxruntime on cpu (forged), seed 7)", exit 0."""
    rec = await _record(backend, repo)
    _env(backend, monkeypatch, repo)
    runner = CliRunner()
    ok = runner.invoke(cli, ["audit", "replay", str(rec.id)])
    assert ok.exit_code == 0 and ok.stdout.startswith(f"bit-identical: record {rec.id} (clf 1, ")
    _editable(backend)
    execute(
        backend,
        "UPDATE audit_records SET seed = 7, samples = 999, mode = 'deterministic', "
        f"backend = 'onnxruntime', device = 'cpu (forged)' WHERE id = {rec.id}",
    )
    bad = runner.invoke(cli, ["audit", "replay", str(rec.id)])
    assert bad.exit_code == 1, bad.output
    assert bad.stdout.startswith(f"DIFFERENT: record {rec.id} ")
    assert [line.strip() for line in bad.stdout.splitlines()[1:]] == [
        'column backend: stored "onnxruntime", the answer gives "torch"',
        'column device: stored "cpu (forged)", the answer gives "cpu"',
        'column mode: stored "deterministic", the answer gives "mc"',
        "column samples: stored 999, the answer gives 40",
        "column seed: stored 7, the answer gives 5",
    ]


def test_the_model_version_columns_are_checked_against_the_answer() -> None:
    """A changed model, version or digest mostly stops the replay (no such bundle); one that
    names another bundle consistently must still be named, and an answer that lacks a field (an
    older form) checks nothing for it."""
    summary = {
        "predictions": [{"mean": 1.0}],
        "model": {"name": "reg", "version": "1", "digest": "sha256:aa"},
        "backend": "torch",
        "device": "cpu",
        "mode": "mc",
        "samples": 10,
        "seed": 3,
    }
    rec = AuditRecord(
        **{f.name: None for f in dataclasses.fields(AuditRecord)}
        | {"model": "reg", "version": "1", "digest": "sha256:aa", "backend": "torch"}
        | {"device": "cpu", "mode": "mc", "samples": 10, "seed": 3, "n_inputs": 1}
        | {"summary": orjson.dumps(summary).decode(), "params": {}}
    )
    assert derived(rec) == []
    forged = dataclasses.replace(rec, model="clf", version="2", digest="sha256:bb")
    assert derived(forged) == [
        'column model: stored "clf", the answer gives "reg"',
        'column version: stored "2", the answer gives "1"',
        'column digest: stored "sha256:bb", the answer gives "sha256:aa"',
    ]
    older = {k: v for k, v in summary.items() if k not in ("model", "seed")}
    assert derived(dataclasses.replace(forged, summary=orjson.dumps(older).decode())) == []


async def test_a_sealed_record_with_a_seed_in_clear_is_different(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In hmac mode the seed is kept only sealed; one written in clear beside it is a column
    the replay (which reads the sealed seed) never used, and the verdict must not pass it."""
    backend = Backend("sqlite", {"audit_path": tmp_path / "audit.db"})
    rec = await _record(backend, repo, audit_inputs="hmac", audit_hmac_key=KEY)
    assert rec.seed is None
    _env(backend, monkeypatch, repo)
    monkeypatch.setenv("MCSERVE_AUDIT_HMAC_KEY", KEY)
    inputs = tmp_path / "inputs.json"
    inputs.write_bytes(orjson.dumps([ROW]))
    runner = CliRunner()
    args = ["audit", "replay", str(rec.id), "--inputs", str(inputs)]
    ok = runner.invoke(cli, args)
    assert ok.exit_code == 0 and ok.stdout.startswith("bit-identical: "), ok.output
    _editable(backend)
    execute(backend, f"UPDATE audit_records SET seed = 7 WHERE id = {rec.id}")
    bad = runner.invoke(cli, args)
    assert bad.exit_code == 1, bad.output
    assert "  column seed: stored 7, but the seed of a sealed answer is kept only sealed" in (
        bad.stdout
    )


async def test_a_store_of_another_schema_is_a_failure_not_a_traceback(
    backend: Backend, repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rec = await _record(backend, repo)
    _env(backend, monkeypatch, repo)
    runner = CliRunner()
    commands = (["show", str(rec.id)], ["replay", str(rec.id)])
    now = "datetime('now')" if backend.name == "sqlite" else "now()"
    # An older schema, or one altered by hand: a column this code reads is missing.
    execute(backend, "ALTER TABLE audit_records RENAME COLUMN software TO software_info")
    for args in commands:
        done = runner.invoke(cli, ["audit", *args])
        assert done.exit_code == 2, done.output  # was 1, a KeyError: 'software'
        assert done.exception is None or isinstance(done.exception, SystemExit)
        assert done.stderr.startswith("error: the audit store "), done.stderr
        assert "lacks column software of audit_records (schema version 1; " in done.stderr
    # A newer schema: refused, as the server refuses it, whatever its columns.
    execute(backend, "ALTER TABLE audit_records RENAME COLUMN software_info TO software")
    execute(backend, f"INSERT INTO audit_schema_version VALUES (2, {now})")
    for args in commands:
        done = runner.invoke(cli, ["audit", *args])
        assert done.exit_code == 2, done.output  # was 0: read as if it were version 1
        assert "has schema version 2, newer than this mcserve knows (1)" in done.stderr
        assert done.stderr.count("\n") == 1


async def test_path_wins_over_the_environments_url(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With MCSERVE_AUDIT_URL set (a machine set up like the server), `--path` was ignored and
    the URL's store was read: here one that cannot be reached, so the old code fails."""
    db = tmp_path / "evidence.db"
    rec = await _record(Backend("sqlite", {"audit_path": db}), repo)
    monkeypatch.setenv("MCSERVE_AUDIT_URL", "postgresql://auditor@127.0.0.1:1/live")
    runner = CliRunner()
    shown = runner.invoke(cli, ["audit", "show", str(rec.id), "--path", str(db)])
    assert shown.exit_code == 0, shown.output
    assert orjson.loads(shown.stdout)["request_id"] == rec.request_id
    both = ["--path", str(db), "--url", "postgresql://auditor@127.0.0.1:1/live"]
    refused = runner.invoke(cli, ["audit", "show", str(rec.id), *both])
    assert refused.exit_code == 2
    assert refused.stderr == "error: give --url (PostgreSQL) or --path (a SQLite file), not both\n"
