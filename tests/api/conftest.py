"""A model repository of tiny bundles and an in-process app (lifespan run) shared by API tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest_asyncio
from apps import asgi_client, running
from fastapi import FastAPI

from service.settings import Settings


@pytest_asyncio.fixture(scope="session")
async def app(repo: Path) -> AsyncIterator[FastAPI]:
    # Compute on the thread: these tests hold the executor to keep requests queued (the compute
    # process has its own tests: test_compute_process.py).
    settings = Settings(
        model_dir=repo, max_instances=50, max_body_bytes=64_000, compute_process=False
    )
    async with running(settings) as application:
        yield application


@pytest_asyncio.fixture(scope="session")
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(app) as c:
        yield c
