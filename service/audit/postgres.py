"""The audit store on PostgreSQL (psycopg 3): the same two append-only tables as SQLite's,
with triggers that refuse UPDATE, DELETE and TRUNCATE (sqlite.py).

Every call has a deadline. A connection whose path stalls (a proxy or NAT that stops forwarding,
a peer gone without a reset) otherwise blocks the write forever: no error, the store still
counted healthy while the queue fills. So: the server's `statement_timeout` (a statement the
server cannot finish), TCP keepalives and `tcp_user_timeout` (a peer that no longer answers at
the TCP level), and a client-side deadline that shuts the socket down when no answer came in
time (a path that still acknowledges TCP but forwards nothing, which neither of the others sees).
Settings the URL gives itself are kept.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from service.audit.once import Once, probe_sql
from service.audit.store import (
    SCHEMA_VERSION,
    Rejected,
    Rows,
    Store,
    StoreError,
    StoreTimeout,
    check_version,
)

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
    so that replicas starting together migrate once. `timeout_s`: the server's statement_timeout
    and the TCP user timeout; a call without an answer for 1.5 times that fails (the module's
    docstring says why each)."""

    mark = "%s"
    MIGRATE_TIMEOUT_S = 60.0  # waiting for another replica's migration is no stall

    def __init__(self, url: str, connect_timeout_s: float = 5.0, timeout_s: float = 5.0) -> None:
        import psycopg  # here: a writer process on SQLite never loads it

        self.data_errors = (psycopg.DataError, psycopg.IntegrityError, OverflowError, UnicodeError)
        self.url = url
        self.description = redact(url)  # the URL names its scheme
        self.connect_timeout_s = connect_timeout_s
        self.timeout_s = timeout_s
        self._conn: Any = None
        self._once = Once()  # a batch whose COMMIT's answer was lost is not written twice
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
                **timeouts(self.url, self.timeout_s),
            )
        except psycopg.Error as exc:
            self._conn = None
            raise StoreError(
                f"cannot connect to the audit database {self.description}: {exc}"
            ) from exc
        return self._conn

    @contextlib.contextmanager
    def _deadline(self, seconds: float) -> Iterator[Any]:
        """The connection, shut down if the call in this block has no answer within `seconds`:
        the blocked call then fails at once (and the connection is opened again next time)."""
        import psycopg

        conn = self._connect()
        lock, state = threading.Lock(), {"done": False, "cut": False}

        def cut() -> None:
            with lock:
                if state["done"]:
                    return
                state["cut"] = True
                with contextlib.suppress(OSError, psycopg.Error):
                    dup = socket.socket(fileno=os.dup(conn.pgconn.socket))
                    with dup:
                        dup.shutdown(socket.SHUT_RDWR)

        timer = threading.Timer(seconds, cut)
        timer.daemon = True
        timer.start()
        try:
            yield conn
        except (psycopg.Error, OSError) as exc:
            if state["cut"]:
                raise StoreTimeout(
                    f"the audit database {self.description} did not answer within {seconds:g} s "
                    "(a stalled connection, or a link too slow for the batch: the next try sends "
                    "a smaller one); it is closed and opened again for the next try"
                ) from exc
            if isinstance(exc, psycopg.errors.QueryCanceled):  # statement_timeout
                raise StoreTimeout(
                    f"the audit database {self.description} cancelled a statement that ran past "
                    f"its statement_timeout (a slow link or server; the next try sends a smaller "
                    f"batch): {exc}"
                ) from exc
            raise
        finally:
            with lock:
                state["done"] = True
            timer.cancel()

    def version(self) -> int | None:
        """The schema version in place; None without `audit_schema_version`. Reads only: a role
        with no CREATE privilege can run it (PostgreSQL checks CREATE even for CREATE TABLE IF
        NOT EXISTS on a table that exists)."""
        [found] = self._query("SELECT to_regclass('audit_schema_version') IS NOT NULL AS t", ())
        if not found["t"]:
            return None
        [row] = self._query("SELECT MAX(version) AS v FROM audit_schema_version", ())
        return int(row["v"] or 0)

    def migrate(self) -> int:
        # Read first, and take the lock and run DDL only when there is something to do: the
        # INSERT+SELECT role docs/AUDIT.md recommends for a store in place cannot create.
        current = self.version()
        if current is not None and current >= SCHEMA_VERSION:
            check_version(current, self.description)
            return SCHEMA_VERSION
        seconds = self.MIGRATE_TIMEOUT_S
        with self._deadline(seconds) as conn, conn.transaction(), conn.cursor() as cur:
            cur.execute(f"SET LOCAL statement_timeout = {round(seconds * 1000)}")
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

    def append(self, records: Rows, feedback: Rows) -> list[Rejected]:
        def lost() -> bool:  # the connection is gone: the COMMIT may or may not have happened
            conn = self._conn
            return conn is None or bool(conn.closed) or bool(conn.broken)

        def exists(table: str, row: dict[str, Any]) -> bool:
            return bool(self._query(*probe_sql(table, row)))

        write = super().append
        return self._once.append(records, feedback, write, exists, lost, lambda: self.rejecting)

    def _transaction(self, work: Callable[[], None]) -> None:
        with self._deadline(1.5 * self.timeout_s) as conn, conn.transaction():
            work()

    def _savepoint(self, work: Callable[[], None]) -> None:
        with self._conn.transaction():  # nested in `_transaction`'s: a savepoint
            work()

    def _insert(self, table: str, columns: Sequence[str], rows: Rows) -> None:
        # COPY: one round trip per batch and the server's cheapest way to take rows.
        sql = f"COPY {table} ({', '.join(columns)}) FROM STDIN"
        with self._conn.cursor() as cur, cur.copy(sql) as copy:
            for r in rows:
                copy.write_row(tuple(map(r.get, columns)))

    def _query(self, sql: str, args: Sequence[Any]) -> list[dict[str, Any]]:
        with self._deadline(1.5 * self.timeout_s) as conn, conn.transaction(), conn.cursor() as c:
            c.execute(sql, tuple(args))
            return list(c.fetchall())

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def timeouts(url: str, timeout_s: float) -> dict[str, Any]:
    """Connection parameters that bound a stalled call (the module's docstring), less those the
    URL sets itself (an operator's choice wins)."""
    from psycopg.conninfo import conninfo_to_dict

    given = conninfo_to_dict(url)
    ms = round(timeout_s * 1000)
    out: dict[str, Any] = {
        k: v
        for k, v in {
            "keepalives": 1,
            "keepalives_idle": max(1, round(timeout_s)),
            "keepalives_interval": max(1, round(timeout_s / 3)),
            "keepalives_count": 3,
            "tcp_user_timeout": ms,
        }.items()
        if k not in given
    }
    # libpq reads PGOPTIONS only when no `options` is passed: start from it (an operator's).
    options = str(given.get("options") or os.environ.get("PGOPTIONS") or "")
    if "statement_timeout" not in options:
        out["options"] = f"{options} -c statement_timeout={ms}".strip()
    return out


# libpq parameters that hold a secret (the URL's user:password part is the other place).
SECRET_PARAMETERS = frozenset({"password", "sslpassword"})


NOT_A_URL = "(not a URL: not shown, it may hold a password)"


def is_url(value: str) -> bool:
    """Whether `value` is written as a URL (scheme://...), not as a libpq keyword string."""
    return re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", value) is not None


def redact(url: str) -> str:
    """The URL without its passwords (user:password@, ?password=, ?sslpassword=), for messages
    and logs; a URL that cannot be parsed is named by its scheme alone, and anything that is
    not a URL (a keyword string, `host=h password=secret`) not at all."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    if not is_url(url):
        return NOT_A_URL
    try:
        parts = urlsplit(url)
        port = parts.port
        query = parse_qsl(parts.query, keep_blank_values=True)
    except ValueError:
        return url.split(":", 1)[0] + "://(unparsable URL, not shown)"
    if parts.password is not None:
        host = parts.hostname or ""
        netloc = f"{parts.username}:***@{host}" + (f":{port}" if port else "")
        parts = parts._replace(netloc=netloc)
    if any(k.lower() in SECRET_PARAMETERS for k, _ in query):
        safe = [(k, "***" if k.lower() in SECRET_PARAMETERS else v) for k, v in query]
        parts = parts._replace(query=urlencode(safe, safe="*"))
    return urlunsplit(parts)
