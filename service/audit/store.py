"""The audit store: an append-only pair of tables on SQLite (default, here) or PostgreSQL
(postgres.py); `backend.open_store` picks one.

The service creates and migrates the schema itself (`audit_schema_version` holds the applied
versions; a store newer than this code is refused, never downgraded). Triggers refuse UPDATE
and DELETE on the audit tables: the service only ever appends, and an accidental edit fails
loudly. (Someone with the database owner's rights can still drop a trigger; replay detects a
changed summary, see `replay.py`.)

One `Store` is used by one thread at a time: the writer's thread, or a CLI command.
"""

from __future__ import annotations

import os
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from service.audit.rows import FEEDBACK_COLUMNS, RECORD_COLUMNS, AuditRecord, from_row
from service.errors import McServeError

SCHEMA_VERSION = 1
SQLITE_MAX_VARIABLES = 999  # the smallest limit any SQLite build has had


class StoreError(McServeError):
    """The audit store cannot be opened, migrated or read."""

    code = "audit_unavailable"


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


def _insert(table: str, columns: Sequence[str], rows: int = 1) -> str:
    """One INSERT of `rows` rows (SQLite placeholders)."""
    one = f"({', '.join(['?'] * len(columns))})"
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES {', '.join([one] * rows)}"


class Store(ABC):
    """Append records and feedback in one transaction; read them back by id or request id."""

    description: str

    @abstractmethod
    def migrate(self) -> int:
        """Create or upgrade the schema; returns the schema version now in place."""

    @abstractmethod
    def append(self, records: list[dict[str, Any]], feedback: list[dict[str, Any]]) -> None:
        """Insert every row in one transaction (all or nothing)."""

    @abstractmethod
    def _query(self, sql: str, args: Sequence[Any]) -> list[dict[str, Any]]: ...

    @abstractmethod
    def close(self) -> None: ...

    mark = "?"

    def find(self, key: str) -> list[AuditRecord]:
        """Records whose id or request id is `key` (a client knows the X-Request-ID)."""
        m = self.mark
        if key.isdigit() and int(key) < 2**63:
            sql = f"SELECT * FROM audit_records WHERE id = {m} OR request_id = {m} ORDER BY id"
            rows = self._query(sql, (int(key), key))
        else:
            rows = self._query(f"SELECT * FROM audit_records WHERE request_id = {m}", (key,))
        return [from_row(r) for r in rows]

    def feedback(self, card_uuid: str) -> list[dict[str, Any]]:
        m = self.mark
        sql = f"SELECT * FROM audit_feedback WHERE card_uuid = {m} ORDER BY id"
        return self._query(sql, (card_uuid,))

    def count(self, table: str = "audit_records") -> int:
        if table not in ("audit_records", "audit_feedback"):
            raise ValueError(table)
        return int(self._query(f"SELECT COUNT(*) AS n FROM {table}", ())[0]["n"])

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SqliteStore(Store):
    """One file in WAL mode; `synchronous=FULL`: a committed batch survives a power cut."""

    def __init__(self, path: Path, busy_timeout_s: float = 1.0) -> None:
        self.path = Path(path)
        self.description = f"sqlite:{self.path}"
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

    def append(self, records: list[dict[str, Any]], feedback: list[dict[str, Any]]) -> None:
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        try:
            self._insert_rows("audit_records", RECORD_COLUMNS, records)
            self._insert_rows("audit_feedback", FEEDBACK_COLUMNS, feedback)
            c.execute("COMMIT")
        except BaseException:
            if c.in_transaction:
                c.execute("ROLLBACK")
            raise

    def _insert_rows(self, table: str, columns: Sequence[str], rows: list[dict[str, Any]]) -> None:
        # Many rows per statement: sqlite3 releases the GIL once per statement step, and each
        # re-acquisition stalls the event loop thread (measured: executemany, one step per row,
        # cost the server more than building the rows).
        per = max(1, SQLITE_MAX_VARIABLES // len(columns))
        for lo in range(0, len(rows), per):
            chunk = rows[lo : lo + per]
            values = [v for r in chunk for v in _sqlite_values(r, columns)]
            self.conn.execute(_insert(table, columns, len(chunk)), values)

    def _query(self, sql: str, args: Sequence[Any]) -> list[dict[str, Any]]:
        return [dict(r) for r in self.conn.execute(sql, tuple(args)).fetchall()]

    def close(self) -> None:
        self.conn.close()


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


def check_version(current: int, where: str) -> None:
    if current > SCHEMA_VERSION:
        raise StoreError(
            f"the audit store {where} has schema version {current}, newer than this mcserve "
            f"knows ({SCHEMA_VERSION}); upgrade mcserve (a store is never downgraded)"
        )
