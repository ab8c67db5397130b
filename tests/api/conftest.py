"""A model repository of tiny bundles and an in-process app (lifespan run) shared by API tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
import torch
from fastapi import FastAPI
from nets import mlp

from service.api.app import create_app
from service.bundle import save
from service.settings import Settings

FEATURES = ["f0", "f1", "f2", "f3"]


@pytest.fixture(scope="session")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    torch.manual_seed(0)
    save(
        mlp(0.25, d_in=4, hidden=16, d_out=3),
        torch.randn(4, 4),
        out_dir=root,
        name="clf",
        version="1",
        task="classification",
        intended_use="tests only",
        labels=["red", "green", "blue"],
        feature_names=FEATURES,
        units=["cm", None, None, None],
        valid_ranges=[(-10.0, 10.0)] * 4,
        training_ranges=[(-3.0, 3.0)] * 4,
    )
    save(
        mlp(0.25, d_in=3, hidden=16, d_out=1),
        torch.randn(4, 3),
        out_dir=root,
        name="reg",
        version="1",
        task="regression",
        intended_use="tests only",
        target="y",
        noise_var=0.25,
    )
    return root


async def start(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


@pytest_asyncio.fixture(scope="session")
async def app(repo: Path) -> AsyncIterator[FastAPI]:
    application = create_app(Settings(model_dir=repo, max_instances=50, max_body_bytes=64_000))
    async with application.router.lifespan_context(application):
        yield application


@pytest_asyncio.fixture(scope="session")
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c
