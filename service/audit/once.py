"""PostgreSQL: a batch is written once even when a try's COMMIT has no known outcome.

The client-side deadline (postgres.py) cuts a connection that gives no answer; that can happen
after the server committed, before its answer arrived. The try then fails, the writer retries the
same rows (or, after a timeout, the first half of them: writer.py), and they were written twice.
So a try that failed with its connection lost is remembered; before the next try, one row it
would have kept is looked up (a transaction commits all its kept rows or none). If that row is
there, the remembered rows count as written: they are left out of this and later batches until
a batch holds none of them (the writer's queue moves on only after a success).
Each record is told apart by when it was recorded (to the microsecond), its request id, replica
and model; each piece of feedback by when, its card, replica and outcome.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from service.audit.store import Rejected, Rows

KEYS = {
    "audit_records": ("recorded_at", "request_id", "replica", "model"),
    "audit_feedback": ("recorded_at", "card_uuid", "replica", "outcome"),
}
Key = tuple[str, tuple[Any, ...]]
Probe = tuple[str, dict[str, Any]]  # (table, row)


def key(table: str, row: dict[str, Any]) -> Key:
    return table, tuple(row.get(c) for c in KEYS[table])


def probe_sql(table: str, row: dict[str, Any]) -> tuple[str, list[Any]]:
    """A query that finds `row` by its key (`= %s`, not IS NOT DISTINCT FROM: that uses no
    index); NULLs as IS NULL."""
    where, args = [], []
    for c in KEYS[table]:
        if row.get(c) is None:
            where.append(f"{c} IS NULL")
        else:
            where.append(f"{c} = %s")
            args.append(row[c])
    return f"SELECT 1 AS found FROM {table} WHERE {' AND '.join(where)} LIMIT 1", args


class Unsure(NamedTuple):
    keys: frozenset[Key]  # every row of the try
    probe: Probe | None  # a row the try kept: in the store if and only if it committed


class Once:
    """The rows of tries whose outcome was unknown; used by one store, on one thread."""

    def __init__(self) -> None:
        self.unsure: Unsure | None = None
        self.written: frozenset[Key] = frozenset()

    def append(
        self,
        records: Rows,
        feedback: Rows,
        write: Callable[[Rows, Rows], list[Rejected]],
        exists: Callable[[str, dict[str, Any]], bool],
        lost: Callable[[], bool],
        rejecting: Callable[[], Sequence[Rejected]],
    ) -> list[Rejected]:
        """`write` the rows not already written; on failure, `lost()` says whether the
        outcome is unknown, `rejecting()` which rows the try was leaving out."""
        if self.unsure is not None:
            unsure = self.unsure
            if unsure.probe is not None and exists(*unsure.probe):  # may raise: asked again
                self.written |= unsure.keys
            self.unsure = None
        given = {"audit_records": records, "audit_feedback": feedback}
        keys = {t: [key(t, r) for r in rows] for t, rows in given.items()}
        if self.written and not any(k in self.written for ks in keys.values() for k in ks):
            self.written = frozenset()  # the queue has moved past them
        kept = {t: [i for i, k in enumerate(ks) if k not in self.written] for t, ks in keys.items()}
        rows = {t: [given[t][i] for i in kept[t]] for t in given}
        recs, fb = rows["audit_records"], rows["audit_feedback"]
        if not recs and not fb:
            return []  # all written by a try whose answer was lost
        try:
            rejected = write(recs, fb)
        except BaseException:
            if lost():
                tried = frozenset(keys[t][i] for t in kept for i in kept[t])
                self.unsure = Unsure(tried, probe_of(rows, rejecting()))
            raise
        return [Rejected(r.table, kept[r.table][r.row], r.why) for r in rejected]


def probe_of(rows: dict[str, Rows], rejected: Sequence[Rejected]) -> Probe | None:
    """The first row the try kept (one it was not leaving out)."""
    left = {(r.table, r.row) for r in rejected}
    for table, table_rows in rows.items():
        for i, row in enumerate(table_rows):
            if (table, i) not in left:
                return table, row
    return None
