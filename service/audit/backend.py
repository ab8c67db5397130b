"""Which audit store a configuration names: PostgreSQL for a URL, else the SQLite file."""

from __future__ import annotations

from pathlib import Path

from service.audit.postgres import PostgresStore, is_url, redact
from service.audit.sqlite import SqliteStore
from service.audit.store import Store, StoreError


def open_store(
    url: str | None, path: Path, timeout_s: float = 5.0, *, read_only: bool = False
) -> Store:
    """PostgreSQL when `url` is set (postgresql:// or postgres://), else SQLite at `path`.
    `timeout_s`: PostgreSQL's bound on a stalled call (postgres.py). `read_only`: for reading
    only (the CLI): a SQLite file is neither created nor changed."""
    if url:
        if not url.startswith(("postgresql://", "postgres://")):
            # A keyword string ("host=h password=secret") is never echoed: redact() hides it.
            got = repr(redact(url)) if is_url(url) else "a value that is not a URL (not shown)"
            raise StoreError(
                f"audit_url must be a postgresql:// URL, got {got} "
                "(leave it empty for SQLite at audit_path)"
            )
        return PostgresStore(url, timeout_s=timeout_s)
    return SqliteStore(path, read_only=read_only)
