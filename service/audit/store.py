"""The audit store: an append-only pair of tables on SQLite (default, sqlite.py) or PostgreSQL
(postgres.py); `backend.open_store` picks one. Here: what both share (appending a batch, with
the rows the database refuses left out; reading records back).

The service creates and migrates the schema itself (`audit_schema_version` holds the applied
versions; a store newer than this code is refused, never downgraded). Triggers refuse UPDATE
and DELETE on the audit tables: the service only ever appends, and an accidental edit fails
loudly. (Someone with the database owner's rights can still drop a trigger; replay detects a
changed summary, or a changed column made from it, see `replay.py`.)

One `Store` is used by one thread at a time: the writer's thread, or a CLI command.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from service.audit.rows import FEEDBACK_COLUMNS, RECORD_COLUMNS, AuditRecord, from_row
from service.errors import McServeError

SCHEMA_VERSION = 1


class StoreError(McServeError):
    """The audit store cannot be opened, migrated or read."""

    code = "audit_unavailable"


class StoreTimeout(StoreError):
    """A call ran past its deadline (PostgreSQL: statement_timeout, or the connection was cut):
    the writer sends a smaller batch next (a slow link may not carry a large one in time)."""


class Rejected(NamedTuple):
    """A row the database refused for its values: left out of its batch, not retried."""

    table: str
    row: int  # its index in that table's rows of the batch
    why: str


Rows = list[dict[str, Any]]


def isolate(
    rows: Rows, insert: Callable[[Rows], None], errors: tuple[type[BaseException], ...]
) -> list[tuple[int, str]]:
    """Insert `rows`, halving any part that fails with one of `errors` (each part is atomic:
    a savepoint) down to the rows that fail alone; returns those as [(index, why)]. k bad rows
    of n cost about 2 k log2(n) attempts."""
    bad: list[tuple[int, str]] = []

    def part(lo: int, hi: int) -> None:
        try:
            insert(rows[lo:hi])
        except errors as exc:
            if hi - lo == 1:
                first = str(exc).splitlines()[0] if str(exc) else ""
                bad.append((lo, f"the database refused the row: {type(exc).__name__}: {first}"))
                return
            mid = (lo + hi) // 2
            part(lo, mid)
            part(mid, hi)

    if rows:
        part(0, len(rows))
    return bad


def is_record_id(key: str) -> bool:
    """Whether `key` is written as a record id: ASCII digits without a leading zero (so "²" or
    "0002" are request ids only), within the ids' 63 bits."""
    return key.isascii() and key.isdigit() and str(int(key)) == key and int(key) < 2**63


class Store(ABC):
    """Append records and feedback in one transaction; read them back by id or request id."""

    description: str
    # Errors a database raises for a row's values (retrying cannot help): see `append`.
    data_errors: tuple[type[BaseException], ...] = (OverflowError, UnicodeError)
    # The rows `append` is leaving out so far (read by a store that must know which rows a
    # failed try would have kept: postgres.py).
    rejecting: Sequence[Rejected] = ()

    @abstractmethod
    def migrate(self) -> int:
        """Create or upgrade the schema; returns the schema version now in place."""

    @abstractmethod
    def version(self) -> int | None:
        """The schema version in place; None without `audit_schema_version`. Reads only."""

    @abstractmethod
    def _transaction(self, work: Callable[[], None]) -> None:
        """work() in one transaction, committed; rolled back when it raises."""

    @abstractmethod
    def _savepoint(self, work: Callable[[], None]) -> None:
        """work() inside the current transaction, undone alone when it raises."""

    @abstractmethod
    def _insert(self, table: str, columns: Sequence[str], rows: Rows) -> None: ...

    @abstractmethod
    def _query(self, sql: str, args: Sequence[Any]) -> list[dict[str, Any]]: ...

    @abstractmethod
    def close(self) -> None: ...

    mark = "?"

    def append(self, records: Rows, feedback: Rows) -> list[Rejected]:
        """Insert every row in one transaction. Rows the database refuses for their values (a
        NUL in a PostgreSQL text, a number out of range: `data_errors`) are left out and
        returned, the others written: such a batch failed whole and was retried forever, every
        later record queued behind it. Any other failure raises; nothing is written."""
        tables = (
            ("audit_records", RECORD_COLUMNS, records),
            ("audit_feedback", FEEDBACK_COLUMNS, feedback),
        )

        def whole() -> None:
            for table, columns, rows in tables:
                if rows:
                    self._insert(table, columns, rows)

        rejected: list[Rejected] = []
        self.rejecting = rejected
        try:
            self._transaction(whole)
            return []
        except self.data_errors:
            pass  # again, one savepoint per part, to find the rows at fault

        def careful() -> None:
            rejected.clear()  # a transaction begun again starts over
            for table, columns, rows in tables:
                insert = self._part_inserter(table, columns)
                bad = isolate(rows, insert, self.data_errors)
                rejected.extend(Rejected(table, i, why) for i, why in bad)

        self._transaction(careful)
        return rejected

    def _part_inserter(self, table: str, columns: Sequence[str]) -> Callable[[Rows], None]:
        """Inserts a part of a table's rows in a savepoint of its own (`isolate`)."""
        return lambda part: self._savepoint(lambda: self._insert(table, columns, part))

    def find(self, key: str) -> list[AuditRecord]:
        """Records whose id or request id is `key` (a client knows the X-Request-ID)."""
        m = self.mark
        if is_record_id(key):
            sql = f"SELECT * FROM audit_records WHERE id = {m} OR request_id = {m} ORDER BY id"
            rows = self._query(sql, (int(key), key))
        else:
            rows = self._query(f"SELECT * FROM audit_records WHERE request_id = {m}", (key,))
        return self._records(rows)

    def get(self, record_id: int) -> AuditRecord | None:
        """The record with this id, if any."""
        rows = self._query(f"SELECT * FROM audit_records WHERE id = {self.mark}", (record_id,))
        return self._records(rows)[0] if rows else None

    def _records(self, rows: Rows) -> list[AuditRecord]:
        """`audit_records` rows as records. A table without a column this code reads (a schema
        from another mcserve, or one altered by hand) is a StoreError naming the column: the
        KeyError it raised was a traceback, and the CLI's exit 1, which means DIFFERENT."""
        missing = [c for c in ("id", *RECORD_COLUMNS) if rows and c not in rows[0]]
        if missing:
            found = self.version()
            schema = f"schema version {found}" if found is not None else "no schema version"
            raise StoreError(
                f"the audit store {self.description} lacks column {', '.join(missing)} of "
                f"audit_records ({schema}; this mcserve reads version {SCHEMA_VERSION}): read "
                "it with the mcserve that wrote it"
            )
        return [from_row(r) for r in rows]

    def ids_of(self, request_id: str, limit: int) -> list[int]:
        """The ids of (at most `limit`) records with this request id, oldest first: only the
        ids, so that a request id a client reused thousands of times costs little."""
        m = self.mark
        sql = f"SELECT id FROM audit_records WHERE request_id = {m} ORDER BY id LIMIT {m}"
        return [int(r["id"]) for r in self._query(sql, (request_id, limit))]

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


def check_version(current: int, where: str) -> None:
    if current > SCHEMA_VERSION:
        raise StoreError(
            f"the audit store {where} has schema version {current}, newer than this mcserve "
            f"knows ({SCHEMA_VERSION}); upgrade mcserve (a store is never downgraded)"
        )
