"""The audit store on PostgreSQL (psycopg 3): the same two append-only tables as SQLite's,
with triggers that refuse UPDATE, DELETE and TRUNCATE (store.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from service.audit.rows import FEEDBACK_COLUMNS, RECORD_COLUMNS
from service.audit.store import SCHEMA_VERSION, Store, StoreError, check_version

POSTGRES_MIGRATIONS: dict[int, list[str]] = {
    1: [
        """CREATE TABLE audit_records (
            id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            recorded_at TIMESTAMPTZ NOT NULL,
            request_id TEXT, route TEXT NOT NULL, caller TEXT,
            model TEXT NOT NULL, version TEXT NOT NULL, digest TEXT NOT NULL,
            backend TEXT NOT NULL, device TEXT NOT NULL, mode TEXT NOT NULL,
            samples INTEGER, seed BIGINT, params TEXT NOT NULL, n_inputs INTEGER NOT NULL,
            inputs BYTEA, inputs_layout TEXT, inputs_hmac TEXT, inputs_key_id TEXT,
            summary TEXT NOT NULL, referral TEXT, referred BOOLEAN, card_uuid TEXT,
            software TEXT NOT NULL, replica TEXT NOT NULL,
            CHECK (inputs IS NOT NULL OR inputs_hmac IS NOT NULL))""",
        "CREATE INDEX audit_records_request_id ON audit_records (request_id)",
        "CREATE INDEX audit_records_card_uuid ON audit_records (card_uuid) "
        "WHERE card_uuid IS NOT NULL",
        """CREATE TABLE audit_feedback (
            id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            recorded_at TIMESTAMPTZ NOT NULL, card_uuid TEXT NOT NULL, outcome TEXT NOT NULL,
            override_reason TEXT, outcome_timestamp TEXT, service_id TEXT, request_id TEXT,
            caller TEXT, replica TEXT NOT NULL)""",
        "CREATE INDEX audit_feedback_card_uuid ON audit_feedback (card_uuid)",
        """CREATE FUNCTION audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN RAISE EXCEPTION '% is append-only', TG_TABLE_NAME; END $$""",
        *(
            f"""CREATE TRIGGER {t}_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON {t}
                FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only()"""
            for t in ("audit_records", "audit_feedback")
        ),
    ],
}


class PostgresStore(Store):
    """psycopg 3; one connection, reopened after a failure; migrations under an advisory lock
    so that replicas starting together migrate once."""

    mark = "%s"

    def __init__(self, url: str, connect_timeout_s: float = 5.0) -> None:
        self.url = url
        self.description = "postgresql:" + redact(url)
        self.connect_timeout_s = connect_timeout_s
        self._conn: Any = None
        self._connect()

    def _connect(self) -> Any:
        import psycopg
        from psycopg.rows import dict_row

        if self._conn is not None and not self._conn.closed and not self._conn.broken:
            return self._conn
        if self._conn is not None:
            self._conn.close()
        try:
            self._conn = psycopg.connect(
                self.url,
                connect_timeout=max(1, round(self.connect_timeout_s)),
                row_factory=dict_row,
            )
        except psycopg.Error as exc:
            self._conn = None
            raise StoreError(
                f"cannot connect to the audit database {self.description}: {exc}"
            ) from exc
        return self._conn

    def migrate(self) -> int:
        conn = self._connect()
        with conn.transaction(), conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(hashtext('mcserve-audit-schema'))")
            cur.execute(
                "CREATE TABLE IF NOT EXISTS audit_schema_version "
                "(version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL)"
            )
            cur.execute("SELECT MAX(version) AS v FROM audit_schema_version")
            row = cur.fetchone()
            current = (row["v"] if row else None) or 0
            check_version(current, self.description)
            for v in range(current + 1, SCHEMA_VERSION + 1):
                for stmt in POSTGRES_MIGRATIONS[v]:
                    cur.execute(stmt)
                cur.execute("INSERT INTO audit_schema_version VALUES (%s, now())", (v,))
        return SCHEMA_VERSION

    def append(self, records: list[dict[str, Any]], feedback: list[dict[str, Any]]) -> None:
        conn = self._connect()
        with conn.transaction(), conn.cursor() as cur:
            # COPY: one round trip per batch and the server's cheapest way to take rows.
            for table, columns, rows in (
                ("audit_records", RECORD_COLUMNS, records),
                ("audit_feedback", FEEDBACK_COLUMNS, feedback),
            ):
                if not rows:
                    continue
                with cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
                    for r in rows:
                        copy.write_row(tuple(map(r.get, columns)))

    def _query(self, sql: str, args: Sequence[Any]) -> list[dict[str, Any]]:
        conn = self._connect()
        with conn.transaction(), conn.cursor() as cur:
            cur.execute(sql, tuple(args))
            return list(cur.fetchall())

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
