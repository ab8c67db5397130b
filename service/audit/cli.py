"""`python -m service audit show ID | replay ID [--inputs FILE]` (ID: record id or request id).

The store and the model repository come from the same settings as the server (MCSERVE_AUDIT_URL
or MCSERVE_AUDIT_PATH, MCSERVE_MODEL_DIR, MCSERVE_AUDIT_HMAC_KEY); options override them.
Exit status: 0 found / bit-identical, 1 replayed but different, 2 cannot (not found, ambiguous,
bundle or inputs missing, no audit tables). Both commands only read: a SQLite file is opened
read-only (never created, switched to WAL or written).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from service.audit.rows import AuditRecord
    from service.audit.store import Store

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Read and replay the audit trail"
)

Url = Annotated[str | None, typer.Option(help="PostgreSQL URL (default: MCSERVE_AUDIT_URL)")]
DbPath = Annotated[Path | None, typer.Option("--path", help="SQLite file (MCSERVE_AUDIT_PATH)")]


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


def _open(url: str | None, path: Path | None) -> Store:
    from service.audit.backend import open_store
    from service.settings import Settings

    if url is not None and path is not None:
        raise _fail("give --url (PostgreSQL) or --path (a SQLite file), not both")
    s = Settings()
    # --path names the file to read: the server's MCSERVE_AUDIT_URL must not win over it (it
    # did: an auditor checking an evidence copy read the live store's record of that id).
    url = url if url is not None else (None if path is not None else s.audit_url)
    path = path or s.audit_path
    if not url and not path.exists():
        raise _fail(f"no audit database at {path} (--path or MCSERVE_AUDIT_PATH)")
    # Read-only: these commands read evidence; a SQLite copy keeps its bytes (sqlite.py).
    return open_store(url, path, read_only=True)


@contextlib.contextmanager
def _reading(url: str | None, path: Path | None) -> Iterator[Store]:
    """The store, open, its schema version one this code reads; a database error while reading
    it (no audit tables there: another database, an empty file) is the exit-2 failure, never a
    traceback with exit 1, which means DIFFERENT."""
    import sqlite3

    import psycopg

    from service.audit.store import check_version

    with _open(url, path) as store:
        try:
            # A newer schema is refused, as the server refuses it: its columns may mean other
            # things. (A missing column is named when a record is read: Store._records.)
            check_version(store.version() or 0, store.description)
            yield store
        except (sqlite3.Error, psycopg.Error) as exc:
            raise _fail(_unreadable(exc, store.description)) from None


def _unreadable(exc: Exception, where: str) -> str:
    import psycopg

    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if isinstance(exc, psycopg.errors.UndefinedTable) or text.startswith("no such table"):
        return f"no audit tables in {where} (not an audit database, or an empty one): {text}"
    return f"cannot read the audit database {where}: {type(exc).__name__}: {text}"


LISTED = 20  # record ids named when a request id is ambiguous


def _one(store: Store, key: str) -> AuditRecord:
    """The record `key` names: a record id (ASCII digits, no leading zero) always reaches its
    record, whatever request ids clients sent; else the one record with that request id."""
    from service.audit.store import is_record_id

    if is_record_id(key):
        rec = store.get(int(key))
        if rec is not None:
            others = [i for i in store.ids_of(key, LISTED + 1) if i != rec.id]
            if others:
                typer.echo(
                    f"note: '{key}' is record {rec.id}; it is also the request id of records "
                    f"{_listed(others)} (give one of those ids to see it)",
                    err=True,
                )
            return rec
    ids = store.ids_of(key, LISTED + 1)
    if not ids:
        raise _fail(f"no audit record with id or request id '{key}' in {store.description}")
    if len(ids) > 1:
        raise _fail(f"request id '{key}' names records {_listed(ids)}: give the record id")
    rec = store.get(ids[0])
    if rec is None:  # cannot happen in an append-only store
        raise _fail(f"record {ids[0]} disappeared from {store.description} while it was read")
    return rec


def _listed(ids: list[int]) -> str:
    shown = ", ".join(str(i) for i in ids[:LISTED])
    return shown + (" and more" if len(ids) > LISTED else "")


def _describe(rec: AuditRecord, feedback: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": rec.id,
        "recorded_at": rec.recorded_at.isoformat(),
        "request_id": rec.request_id,
        "route": rec.route,
        "caller": rec.caller,
        "model": {"name": rec.model, "version": rec.version, "digest": rec.digest},
        "backend": rec.backend,
        "device": rec.device,
        "params": rec.params,
        "inputs": rec.inputs.tolist() if rec.inputs is not None else None,
        "inputs_hmac": rec.inputs_hmac,
        "inputs_key_id": rec.inputs_key_id,
        "referral": rec.referral,
        "referred": rec.referred,
        "card_uuid": rec.card_uuid,
        "feedback": [{k: _shown(k, v) for k, v in f.items() if k != "id"} for f in feedback],
        "software": rec.software,
        "replica": rec.replica,
        "summary": rec.summary,
    }


def _shown(column: str, value: Any) -> Any:
    """A feedback column as shown: a time in UTC (PostgreSQL gives it in the session's zone)."""
    if column == "recorded_at" and isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    return str(value) if column == "recorded_at" else value


@app.command()
def show(
    key: Annotated[str, typer.Argument(metavar="ID", help="record id or request id")],
    url: Url = None,
    path: DbPath = None,
) -> None:
    """Print one record as JSON (with the CDS feedback on its card, if any). An HMAC-only
    record's answer is sealed: shown in clear with MCSERVE_AUDIT_HMAC_KEY, else as stored."""
    import orjson

    from service.audit.seal import SealError, is_sealed, reveal
    from service.errors import McServeError
    from service.settings import Settings

    secret = Settings().audit_hmac_key
    try:
        with _reading(url, path) as store:
            rec = _one(store, key)
            feedback = store.feedback(rec.card_uuid) if rec.card_uuid else []
        if is_sealed(rec.summary) and secret is not None:
            rec = reveal(rec, secret.get_secret_value().encode())
    except McServeError as exc:
        raise _fail(exc.message) from None
    except SealError as exc:
        raise _fail(str(exc)) from None
    doc = _describe(rec, feedback)
    if is_sealed(rec.summary):
        typer.echo(
            "note: the answer and seed are sealed; MCSERVE_AUDIT_HMAC_KEY opens them", err=True
        )
    else:
        doc["summary"] = orjson.loads(rec.summary)
    typer.echo(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())


@app.command()
def replay(
    key: Annotated[str, typer.Argument(metavar="ID", help="record id or request id")],
    inputs: Annotated[
        Path | None,
        typer.Option(help="JSON instances, when the record keeps only an HMAC of its inputs"),
    ] = None,
    model_dir: Annotated[Path | None, typer.Option(help="model repository")] = None,
    url: Url = None,
    path: DbPath = None,
) -> None:
    """Recompute a recorded prediction and report whether it is bit-identical."""
    from service.audit.compare import derived
    from service.audit.replay import replay as run_replay
    from service.audit.seal import is_sealed
    from service.bundle.load import TrustPolicy
    from service.errors import McServeError
    from service.settings import Settings

    s = Settings()
    key_bytes = s.audit_hmac_key.get_secret_value().encode() if s.audit_hmac_key else None
    try:
        with _reading(url, path) as store:
            rec = _one(store, key)
        result = run_replay(
            rec,
            model_dir or s.model_dir,
            inputs=inputs,
            hmac_key=key_bytes,
            policy=TrustPolicy.from_settings(s),
        )
    except McServeError as exc:
        raise _fail(exc.message) from None
    # The replay saw the record opened (seal.reveal replaces its seed): whether the stored row
    # keeps a seed in clear beside the sealed one, which it must not, only the stored row says.
    if is_sealed(rec.summary):
        sealed_columns = derived(rec)
        result.identical = result.identical and not sealed_columns
        result.differences += sealed_columns
    # Its seed in clear, also when the record keeps it sealed. These columns were checked
    # against the answer (compare.derived): "bit-identical" vouches for what it names.
    rec = result.record
    what = f"record {rec.id} ({rec.model} {rec.version}, {rec.backend} on {rec.device}"
    what += f", seed {rec.seed})" if rec.seed is not None else ")"
    if result.identical:
        typer.echo(f"bit-identical: {what}")
    else:
        typer.echo(f"DIFFERENT: {what}")
        if result.size is not None:
            typer.echo(f"size: {result.size.describe()}")
        for d in result.differences:
            typer.echo(f"  {d}")
    for note in result.notes:
        typer.echo(f"note: {note}", err=True)
    if not result.identical:
        raise typer.Exit(1)
