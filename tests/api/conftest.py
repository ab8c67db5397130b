"""A model repository of tiny bundles and an in-process app (lifespan run) shared by API tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest_asyncio
from fastapi import FastAPI

from service.api.app import create_app
from service.settings import Settings


async def start(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


@pytest_asyncio.fixture(scope="session")
async def app(repo: Path) -> AsyncIterator[FastAPI]:
    # Compute on the thread: these tests hold the executor to keep requests queued (the compute
    # process has its own tests: test_compute_process.py).
    settings = Settings(
        model_dir=repo, max_instances=50, max_body_bytes=64_000, compute_process=False
    )
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application


@pytest_asyncio.fixture(scope="session")
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c
