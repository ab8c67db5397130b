"""The audit store on SQLite (the standard library's sqlite3): one file in WAL mode, the same two
append-only tables as PostgreSQL's (postgres.py), with triggers that refuse UPDATE and DELETE."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from service.audit.store import SCHEMA_VERSION, Rows, Store, StoreError, check_version

SQLITE_MAX_VARIABLES = 999  # the smallest limit any SQLite build has had

SQLITE_MIGRATIONS: dict[int, list[str]] = {
    1: [
        """CREATE TABLE audit_records (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            recorded_at TEXT NOT NULL,
            request_id TEXT, route TEXT NOT NULL, caller TEXT,
            model TEXT NOT NULL, version TEXT NOT NULL, digest TEXT NOT NULL,
            backend TEXT NOT NULL, device TEXT NOT NULL, mode TEXT NOT NULL,
            samples INTEGER, seed INTEGER, params TEXT NOT NULL, n_inputs INTEGER NOT NULL,
            inputs BLOB, inputs_layout TEXT, inputs_hmac TEXT, inputs_key_id TEXT,
            summary TEXT NOT NULL, referral TEXT, referred INTEGER, card_uuid TEXT,
            software TEXT NOT NULL, replica TEXT NOT NULL,
            CHECK (inputs IS NOT NULL OR inputs_hmac IS NOT NULL))""",
        "CREATE INDEX audit_records_request_id ON audit_records (request_id)",
        "CREATE INDEX audit_records_card_uuid ON audit_records (card_uuid) "
        "WHERE card_uuid IS NOT NULL",
        """CREATE TABLE audit_feedback (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            recorded_at TEXT NOT NULL, card_uuid TEXT NOT NULL, outcome TEXT NOT NULL,
            override_reason TEXT, outcome_timestamp TEXT, service_id TEXT, request_id TEXT,
            caller TEXT, replica TEXT NOT NULL)""",
        "CREATE INDEX audit_feedback_card_uuid ON audit_feedback (card_uuid)",
        *(
            f"""CREATE TRIGGER {t}_no_{op.lower()} BEFORE {op} ON {t}
                BEGIN SELECT RAISE(ABORT, '{t} is append-only'); END"""
            for t in ("audit_records", "audit_feedback")
            for op in ("UPDATE", "DELETE")
        ),
    ],
}


def _insert_sql(table: str, columns: Sequence[str], rows: int = 1) -> str:
    """One INSERT of `rows` rows (SQLite placeholders)."""
    one = f"({', '.join(['?'] * len(columns))})"
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES {', '.join([one] * rows)}"


class SqliteStore(Store):
    """One file in WAL mode; `synchronous=FULL`: a committed batch survives a power cut.
    `read_only` (the CLI's reading commands): the file is opened as it is, never created,
    switched to WAL or otherwise written (an evidence copy keeps its bytes)."""

    def __init__(self, path: Path, busy_timeout_s: float = 1.0, read_only: bool = False) -> None:
        self.path = Path(path)
        self.description = f"sqlite:{self.path}"
        if read_only:
            try:
                self.conn = _open_read_only(self.path, busy_timeout_s)
            except (sqlite3.Error, OSError) as exc:
                raise StoreError(f"cannot open the audit database {self.path}: {exc}") from exc
            self.conn.row_factory = sqlite3.Row
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            _create_private(self.path)
            self.conn = sqlite3.connect(
                self.path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
            )
            self.conn.row_factory = sqlite3.Row
            mode = self.conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            self.conn.execute("PRAGMA synchronous=FULL")
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open the audit database {self.path}: {exc}") from exc
        if mode != "wal":
            raise StoreError(f"{self.path}: SQLite refused WAL mode (got {mode!r})")

    def version(self) -> int | None:
        found = self._query(
            "SELECT 1 AS t FROM sqlite_master WHERE type = 'table' "
            "AND name = 'audit_schema_version'",
            (),
        )
        if not found:
            return None
        [row] = self._query("SELECT MAX(version) AS v FROM audit_schema_version", ())
        return int(row["v"] or 0)

    def migrate(self) -> int:
        c = self.conn
        c.execute("BEGIN IMMEDIATE")  # one migrating process at a time
        try:
            c.execute(
                "CREATE TABLE IF NOT EXISTS audit_schema_version "
                "(version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
            )
            current = c.execute("SELECT MAX(version) FROM audit_schema_version").fetchone()[0] or 0
            check_version(current, self.description)
            for v in range(current + 1, SCHEMA_VERSION + 1):
                for stmt in SQLITE_MIGRATIONS[v]:
                    c.execute(stmt)
                c.execute(
                    "INSERT INTO audit_schema_version VALUES (?, ?)",
                    (v, datetime.now(UTC).isoformat()),
                )
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise
        return SCHEMA_VERSION

    data_errors = (sqlite3.IntegrityError, sqlite3.DataError, OverflowError, UnicodeError)

    def _transaction(self, work: Callable[[], None]) -> None:
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        try:
            work()
            c.execute("COMMIT")
        except BaseException:
            if c.in_transaction:
                c.execute("ROLLBACK")
            raise

    def _savepoint(self, work: Callable[[], None]) -> None:
        c = self.conn
        c.execute("SAVEPOINT audit_part")
        try:
            work()
        except BaseException:
            c.execute("ROLLBACK TO audit_part")
            c.execute("RELEASE audit_part")
            raise
        c.execute("RELEASE audit_part")

    def _insert(self, table: str, columns: Sequence[str], rows: Rows) -> None:
        # Many rows per statement: sqlite3 releases the GIL once per statement step, and each
        # re-acquisition stalls the event loop thread (measured: executemany, one step per row,
        # cost the server more than building the rows).
        per = max(1, SQLITE_MAX_VARIABLES // len(columns))
        for lo in range(0, len(rows), per):
            chunk = rows[lo : lo + per]
            values = [v for r in chunk for v in _sqlite_values(r, columns)]
            self.conn.execute(_insert_sql(table, columns, len(chunk)), values)

    def _query(self, sql: str, args: Sequence[Any]) -> list[dict[str, Any]]:
        return [dict(r) for r in self.conn.execute(sql, tuple(args)).fetchall()]

    def close(self) -> None:
        self.conn.close()


def _open_read_only(path: Path, busy_timeout_s: float) -> sqlite3.Connection:
    """`path` opened read-only (`mode=ro`: nothing created or written). A WAL-mode file in a
    directory this user cannot write (read-only media, an auditor's copy) cannot be read so:
    SQLite must create its -shm file. Without a -wal file beside it every commit is in the file
    itself, so it is then read as immutable (no locks, no -shm)."""
    uri = path.absolute().as_uri() + "?mode=ro"

    def connect(u: str) -> sqlite3.Connection:
        conn = sqlite3.connect(
            u, uri=True, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
        )
        try:
            conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()  # opens the file
        except BaseException:
            conn.close()
            raise
        return conn

    try:
        return connect(uri)
    except sqlite3.OperationalError as exc:
        # Only for that case: immutable reads the file as it lies, so a live writer's or a
        # crashed one's uncommitted pages (a -journal to roll back, a -wal to add; "database is
        # locked") would be read as evidence.
        cannot_init = getattr(exc, "sqlite_errorname", "") in _CANNOT_INIT
        if not cannot_init or any(Path(f"{path}{s}").exists() for s in ("-wal", "-journal")):
            raise
        return connect(uri + "&immutable=1")


# What mode=ro says of a WAL-mode file whose -shm it may not create.
_CANNOT_INIT = frozenset(
    {"SQLITE_CANTOPEN", "SQLITE_READONLY_CANTINIT", "SQLITE_READONLY_DIRECTORY"}
)


def _create_private(path: Path) -> None:
    """Create the database file owner-only (0600) before SQLite opens it: SQLite would create it
    with 0644 less the umask, readable by every local user, and it gives the -wal and -shm files
    the database file's mode. An existing file keeps the mode its owner gave it."""
    if not path.exists():
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))


def _sqlite_values(row: dict[str, Any], columns: Sequence[str]) -> list[Any]:
    # Times as ISO 8601 text (sqlite3's implicit datetime adapter is deprecated). Only
    # `recorded_at` holds one: converting it alone, not testing every value, halves this
    # per-record cost on the audit thread (it holds the GIL the event loop needs).
    values = list(map(row.get, columns))
    if columns[0] == "recorded_at" and isinstance(values[0], datetime):
        values[0] = values[0].isoformat()
    return values
