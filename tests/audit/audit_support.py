"""Helpers of the audit tests: the two stores, an app with its lifespan, raw SQL as the owner."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
from audit_pg import with_schema
from fastapi import FastAPI
from starlette.requests import Request

from service.api.app import create_app
from service.audit.backend import open_store
from service.audit.store import Store
from service.settings import Settings


@dataclass
class Backend:
    name: str
    settings: dict[str, Any]  # the audit_* settings that select this store
    admin_url: str | None = None  # PostgreSQL: the server's URL without the test's schema

    def open(self) -> Store:
        return open_store(self.settings.get("audit_url"), self.settings.get("audit_path", Path()))


def pg_backend(url: str) -> Iterator[Backend]:
    """One schema per test, dropped afterwards."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield Backend("postgres", {"audit_url": with_schema(url, schema)}, admin_url=url)
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


@asynccontextmanager
async def serving(repo: Path, **settings: Any) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """An app with its lifespan run (start-up, and the flush at shutdown) and a client."""
    settings.setdefault("audit", True)
    app = create_app(Settings(model_dir=repo, **settings))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield app, client


def execute(backend: Backend, sql: str) -> Any:
    """Run SQL on the test's store as its owner would (outside the service)."""
    if backend.name == "sqlite":
        conn = sqlite3.connect(backend.settings["audit_path"], isolation_level=None)
        try:
            row = conn.execute(sql).fetchone()
            return row[0] if row else None
        finally:
            conn.close()
    with psycopg.connect(backend.settings["audit_url"], autocommit=True) as pg:
        cur = pg.execute(sql)
        if cur.description is None:
            return None
        row = cur.fetchone()
        return row[0] if row else None


def fake_request(app: Any, route: str, request_id: str, caller: str) -> Request:
    """A request as an adapter sees it (route template, request id, caller in the state)."""

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()  # the client never disconnects
        return {}

    class Route:
        path = route

    scope = {
        "type": "http",
        "app": app,
        "path": route,
        "headers": [],
        "route": Route(),
        "state": {"request_id": request_id, "caller": caller},
    }
    return Request(scope, receive)
