"""The reading commands (`audit show`, `audit replay`) read evidence and change nothing: a SQLite
copy keeps its bytes (it was switched to WAL and rewritten; an empty file became a database); a
store without audit tables is the exit-2 failure, not a traceback with exit 1 (which means
DIFFERENT); times are shown in UTC whatever the PostgreSQL session's time zone."""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from contextlib import closing
from datetime import timedelta
from pathlib import Path

import orjson
import pytest
from audit_support import Backend, pg_backend, serving
from typer.testing import CliRunner

from service.audit.backend import open_store
from service.cli import app as cli

ROOT = Path(__file__).resolve().parents[2]
BODY = {"instances": [[0.1, -0.2, 0.3, 0.4]], "parameters": {"seed": 1}}


async def _one_record(repo: Path, **settings: object) -> None:
    async with serving(repo, **settings) as (app, client):
        assert (await client.post("/v1/models/clf:predict", json=BODY)).status_code == 200
        assert await app.state.audit.flush(10)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_show_and_replay_leave_an_evidence_copy_as_it_was(repo: Path, tmp_path: Path) -> None:
    await _one_record(repo, audit_path=tmp_path / "audit.db")
    copy = tmp_path / "evidence.db"  # as `sqlite3 audit.db ".backup evidence.db"` makes it
    with (
        closing(sqlite3.connect(tmp_path / "audit.db")) as src,
        closing(sqlite3.connect(copy)) as dst,
    ):
        src.backup(dst)
        dst.execute("PRAGMA journal_mode=DELETE")
    before = _digest(copy)
    runner = CliRunner()
    shown = runner.invoke(cli, ["audit", "show", "1", "--path", str(copy)])
    assert shown.exit_code == 0, shown.output
    replayed = runner.invoke(
        cli, ["audit", "replay", "1", "--path", str(copy), "--model-dir", str(repo)]
    )
    assert replayed.exit_code == 0, replayed.output
    assert _digest(copy) == before  # was rewritten, in WAL mode
    with closing(sqlite3.connect(copy)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("delete",)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit.db", "evidence.db"]


def test_a_read_only_store_writes_nothing(tmp_path: Path) -> None:
    empty = tmp_path / "empty.db"
    empty.touch()
    with (
        open_store(None, empty, read_only=True) as store,
        pytest.raises(sqlite3.OperationalError, match="readonly"),
    ):
        store.migrate()
    assert empty.stat().st_size == 0  # was made a WAL-mode database
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.db"]


def test_a_crashed_writers_uncommitted_pages_are_never_read(tmp_path: Path) -> None:
    """Any failure of the read-only open fell back to reading the file as immutable: with a hot
    journal (a writer that crashed mid-transaction, its pages spilled into the file) the
    uncommitted rows were read as evidence."""
    from service.audit.sqlite import SqliteStore
    from service.audit.store import StoreError

    db = tmp_path / "audit.db"
    SqliteStore(db).close()
    with closing(sqlite3.connect(db)) as c:
        c.execute("PRAGMA journal_mode=DELETE")
        c.execute("CREATE TABLE big(x)")
        c.executemany("INSERT INTO big VALUES (?)", [("committed" + "y" * 500,)] * 3000)
        c.commit()
    code = (
        "import sqlite3, sys, os; c = sqlite3.connect(sys.argv[1], isolation_level=None); "
        "c.execute('PRAGMA cache_size=10'); c.execute('BEGIN'); "
        "c.execute(\"UPDATE big SET x = 'DIRTY' || substr(x, 1, 400)\"); os._exit(9)"
    )
    subprocess.run([sys.executable, "-c", code, str(db)], check=False, timeout=60)
    assert (tmp_path / "audit.db-journal").exists()  # hot: the crash left it to roll back
    with pytest.raises(StoreError, match="cannot open the audit database"):
        SqliteStore(db, read_only=True)


async def test_a_copy_in_a_directory_this_user_cannot_write_is_read(
    repo: Path, tmp_path: Path
) -> None:
    """An auditor's copy on read-only media: SQLite cannot make the -shm file WAL reading needs
    (the command failed: 'attempt to write a readonly database'). As root, which ignores file
    modes, the reading runs as nobody."""
    await _one_record(repo, audit_path=tmp_path / "audit.db")
    top = Path(tempfile.mkdtemp())  # pytest's tmp_path is private to this user
    try:
        ro = top / "ro"
        ro.mkdir()
        shutil.copy(tmp_path / "audit.db", ro / "audit.db")  # WAL mode, no -wal beside it
        (ro / "audit.db").chmod(0o444)
        ro.chmod(0o555)
        top.chmod(0o755)
        code = "from service.audit.sqlite import SqliteStore; import sys; "
        code += "print(SqliteStore(sys.argv[1], read_only=True).get(1).id)"
        cmd = [sys.executable, "-c", code, str(ro / "audit.db")]
        if os.geteuid() == 0:
            cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert (done.returncode, done.stdout) == (0, "1\n"), done.stderr
        assert sorted(p.name for p in ro.iterdir()) == ["audit.db"]
    finally:
        (top / "ro").chmod(0o755)
        shutil.rmtree(top)


def test_a_store_without_audit_tables_is_a_failure_not_a_traceback(
    backend: Backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if backend.name == "sqlite":
        backend.settings["audit_path"].touch()  # an empty file: a database without tables
    for k, v in backend.settings.items():
        monkeypatch.setenv(f"MCSERVE_{k.upper()}", str(v))
    runner = CliRunner()
    for args in (["show", "1"], ["replay", "1", "--model-dir", str(tmp_path)]):
        done = runner.invoke(cli, ["audit", *args])
        assert done.exit_code == 2, done.output  # was 1, with a traceback
        assert done.exception is None or isinstance(done.exception, SystemExit)
        assert done.stderr.startswith("error: no audit tables in "), done.stderr
    if backend.name == "sqlite":
        assert backend.settings["audit_path"].stat().st_size == 0


async def test_times_are_shown_in_utc(
    postgres: str, repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for backend in pg_backend(postgres):
        await _one_record(repo, **backend.settings)
        url = backend.settings["audit_url"]
        kolkata = url.replace("options=", "options=-ctimezone%3DAsia/Kolkata%20", 1)
        with open_store(kolkata, Path(), read_only=True) as store:
            [row] = store._query("SHOW timezone", ())
            assert row["TimeZone"] == "Asia/Kolkata"  # the premise
            rec = store.get(1)
        assert rec is not None and rec.recorded_at.utcoffset() == timedelta(0)  # was +05:30
        monkeypatch.setenv("MCSERVE_AUDIT_URL", kolkata)
        shown = CliRunner().invoke(cli, ["audit", "show", "1"])
        assert shown.exit_code == 0, shown.output
        assert orjson.loads(shown.stdout)["recorded_at"] == rec.recorded_at.isoformat()
        assert rec.recorded_at.isoformat().endswith("+00:00")
