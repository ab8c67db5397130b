"""Audit tests run against both stores: a SQLite file and a real PostgreSQL server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from audit_pg import server
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
