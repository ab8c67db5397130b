"""Audit tests run against both stores: a SQLite file and a real PostgreSQL server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
from audit_pg import server
from audit_proxy import Proxy
from audit_support import Backend, pg_backend


@pytest.fixture(scope="session")
def postgres() -> Iterator[str]:
    """A PostgreSQL URL; FAILS (never skips) when none can be had (see audit_pg.py)."""
    try:
        with server() as url:
            yield url
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        yield Backend("sqlite", {"audit_path": tmp_path / "audit.db"})
        return
    yield from pg_backend(request.getfixturevalue("postgres"))


@pytest.fixture
def via_proxy(postgres: str) -> Iterator[tuple[Backend, Proxy]]:
    """A PostgreSQL backend whose URL goes through a `Proxy` (a stalled or slow path)."""
    parts = urlsplit(postgres)
    proxy = Proxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    proxy.start()
    netloc = parts.netloc.rsplit(":", 1)[0] if parts.port else parts.netloc
    proxied = urlunsplit(parts._replace(netloc=f"{netloc}:{proxy.port}"))
    try:
        for backend in pg_backend(postgres):
            backend.settings["audit_url"] = backend.settings["audit_url"].replace(
                postgres, proxied, 1
            )
            yield backend, proxy
    finally:
        proxy.thaw()
        proxy.stop()
