"""Which audit store a configuration names: PostgreSQL for a URL, else the SQLite file."""

from __future__ import annotations

from pathlib import Path

from service.audit.postgres import PostgresStore, redact
from service.audit.sqlite import SqliteStore
from service.audit.store import Store, StoreError


def open_store(url: str | None, path: Path, timeout_s: float = 5.0) -> Store:
    """PostgreSQL when `url` is set (postgresql:// or postgres://), else SQLite at `path`.
    `timeout_s`: PostgreSQL's bound on a stalled call (postgres.py)."""
    if url:
        if not url.startswith(("postgresql://", "postgres://")):
            raise StoreError(
                f"audit_url must be a postgresql:// URL, got {redact(url)!r} "
                "(leave it empty for SQLite at audit_path)"
            )
        return PostgresStore(url, timeout_s=timeout_s)
    return SqliteStore(path)
