"""The bundled models (versions 1 and 2) plus one broken bundle, and an in-process app over them."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI

from service.api.app import create_app
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
BUNDLED = ("breast-cancer", "diabetes", "digits")


@pytest.fixture(scope="session")
def oip_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("oip-repo")
    for name in BUNDLED:
        shutil.copytree(ROOT / "models" / name, root / name)
    broken = root / "broken" / "1"
    broken.mkdir(parents=True)
    (broken / "manifest.json").write_text("{not json")
    return root


@pytest_asyncio.fixture(scope="session")
async def oip_app(oip_repo: Path) -> AsyncIterator[FastAPI]:
    settings = Settings(
        model_dir=oip_repo,
        required_models=list(BUNDLED),  # the broken bundle is listed, not required
        max_instances=50,
        max_body_bytes=64_000,
    )
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application


@pytest_asyncio.fixture(scope="session")
async def oip(oip_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=oip_app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c
