"""docs/AUDIT.md: once the schema exists, the service's role may have only INSERT and SELECT on
the audit tables. A server with such a role starts and records (it ran CREATE TABLE IF NOT
EXISTS at every start, which PostgreSQL refuses without CREATE on the schema, even for a table
that exists: the server did not start)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
from audit_support import Backend, pg_backend, serving

from service.audit.store import SCHEMA_VERSION

TABLES = ("audit_records", "audit_feedback", "audit_schema_version")


@contextmanager
def insert_select_only(backend: Backend) -> Iterator[str]:
    """A URL whose role has USAGE on the test's schema and INSERT, SELECT on its audit tables,
    nothing more. The test's own role, unless it is a superuser (a throwaway server's postgres:
    privileges do not bind it), then a role made for the test (`role` in the URL's options)."""
    url = backend.settings["audit_url"]
    schema = url.rsplit("%3D", 1)[1]
    with psycopg.connect(url, autocommit=True) as conn:
        superuser = conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
        if not superuser.fetchone()[0]:  # type: ignore[index]
            conn.execute(f"REVOKE CREATE ON SCHEMA {schema} FROM current_user")
            for t in TABLES:
                conn.execute(f"REVOKE ALL ON {t} FROM current_user")
                conn.execute(f"GRANT INSERT, SELECT ON {t} TO current_user")
            try:
                yield url
            finally:  # the schema is dropped by its owner afterwards
                conn.execute(f"GRANT CREATE ON SCHEMA {schema} TO current_user")
            return
        role = f"audit_{uuid.uuid4().hex[:12]}"
        conn.execute(f"CREATE ROLE {role} LOGIN")
        conn.execute(f"GRANT USAGE ON SCHEMA {schema} TO {role}")
        for t in TABLES:
            conn.execute(f"GRANT INSERT, SELECT ON {t} TO {role}")
        parts = urlsplit(url)
        host = parts.netloc.rsplit("@", 1)[-1]
        try:
            yield urlunsplit(parts._replace(netloc=f"{role}@{host}"))
        finally:
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")


async def test_a_role_with_only_insert_and_select_starts_and_records(
    postgres: str, repo: Path
) -> None:
    for backend in pg_backend(postgres):
        with backend.open() as store:
            assert store.migrate() == SCHEMA_VERSION  # as the owner, once
        with insert_select_only(backend) as url:
            with psycopg.connect(url) as conn:  # the premise: this role cannot create
                schema = url.rsplit("%3D", 1)[1]
                row = conn.execute(f"SELECT has_schema_privilege('{schema}', 'CREATE')")
                assert row.fetchone() == (False,)
            body = {"instances": [[0.1, -0.2, 0.3, 0.4]], "parameters": {"seed": 1}}
            async with serving(repo, audit_url=url) as (app, client):  # was: permission denied
                assert (await client.post("/v1/models/clf:predict", json=body)).status_code == 200
                assert await app.state.audit.flush(10)
                assert app.state.audit.store.count() == 1
