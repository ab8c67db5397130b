"""Reload under load: versions come and go while 16 clients keep sending; nothing fails."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

from service.api.app import create_app
from service.api.common.auth import hash_key
from service.settings import ApiKey, Settings

BODY = {"instances": [[0.1, 0.2, 0.3, 0.4]], "parameters": {"samples": 20}}
ADMIN = "admin-key-0c1d"


def add_version(root: Path, version: str) -> None:
    """A new version directory: same artifacts, the manifest naming the new version."""
    src = next(p for p in sorted((root / "clf").iterdir()) if p.is_dir())
    dest = root / "clf" / version
    shutil.copytree(src, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["version"] = version
    (dest / "manifest.json").write_text(json.dumps(manifest))


class Load:
    """16 concurrent clients sending requests without a version until stopped."""

    def __init__(self, client: httpx.AsyncClient, headers: dict[str, str]) -> None:
        self.client = client
        self.headers = headers
        self.stop = asyncio.Event()
        self.results: list[tuple[int, str | None]] = []

    async def one_client(self) -> None:
        while not self.stop.is_set():
            r = await self.client.post("/v1/models/clf:predict", json=BODY, headers=self.headers)
            version = r.json().get("model", {}).get("version") if r.status_code == 200 else None
            self.results.append((r.status_code, version))

    async def until_version(self, version: str, timeout: float = 20) -> None:
        start = len(self.results)
        for _ in range(int(timeout / 0.02)):
            if any(v == version for _, v in self.results[start:]):
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"no answer from version {version}")


async def run_clients(
    app: FastAPI, scenario: Any, headers: dict[str, str] | None = None
) -> list[tuple[int, str | None]]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as c:
            load = Load(c, headers or {})
            tasks = [asyncio.ensure_future(load.one_client()) for _ in range(16)]
            try:
                await scenario(app, c, load)
            finally:
                load.stop.set()
                await asyncio.gather(*tasks)
    return load.results


async def test_polling_adds_and_retires_versions(repo: Path, tmp_path: Path) -> None:
    root = tmp_path / "repo"
    shutil.copytree(repo / "clf", root / "clf")
    app = create_app(Settings(model_dir=root, model_control="poll", poll_interval_s=0.1))

    async def scenario(app: FastAPI, c: httpx.AsyncClient, load: Load) -> None:
        await load.until_version("1")
        add_version(root, "2")
        await load.until_version("2")
        shutil.rmtree(root / "clf" / "1")
        for _ in range(500):
            if ("clf", "1") not in app.state.mcserve.batchers:
                break
            await asyncio.sleep(0.02)
        assert [e.version for e in app.state.mcserve.registry.versions("clf")] == ["2"]
        await load.until_version("2")
        assert (await c.get("/v1/models/clf/versions/1")).status_code == 404

    results = await run_clients(app, scenario)
    assert [s for s, _ in results if s != 200] == []  # zero failed requests
    versions = [v for _, v in results]
    assert set(versions) == {"1", "2"}
    assert versions[-16:] == ["2"] * 16


async def test_explicit_load_and_unload(repo: Path, tmp_path: Path) -> None:
    root = tmp_path / "repo"
    shutil.copytree(repo / "clf", root / "clf")
    admin = {"Authorization": f"Bearer {ADMIN}"}
    keys = [ApiKey(id="admin", sha256=hash_key(ADMIN), admin=True)]
    app = create_app(Settings(model_dir=root, model_control="explicit", api_keys=keys))

    async def scenario(app: FastAPI, c: httpx.AsyncClient, load: Load) -> None:
        await load.until_version("1")
        add_version(root, "2")
        await asyncio.sleep(0.3)  # explicit mode: nothing happens on its own
        assert [e.version for e in app.state.mcserve.registry.versions("clf")] == ["1"]
        r = await c.post("/v2/repository/models/clf/load", headers=admin)
        assert r.status_code == 200, r.text
        assert r.json()["loaded"] == [{"version": "2", "ready": True, "reason": None}]
        await load.until_version("2")
        r = await c.post(
            "/v2/repository/models/clf/unload", headers=admin, json={"parameters": {"version": "1"}}
        )
        assert r.status_code == 200 and r.json()["unloaded_versions"] == 1
        await load.until_version("2")
        assert (await c.get("/v1/models/clf/versions/1", headers=admin)).status_code == 404

    results = await run_clients(app, scenario, admin)
    assert [s for s, _ in results if s != 200] == []
    assert {v for _, v in results} == {"1", "2"}
    assert [v for _, v in results][-16:] == ["2"] * 16


async def test_repository_routes_refused_unless_explicit(repo: Path) -> None:
    keys = [ApiKey(id="admin", sha256=hash_key(ADMIN), admin=True)]
    app = create_app(Settings(model_dir=repo, api_keys=keys))  # model_control: none
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            r = await c.post(
                "/v2/repository/models/clf/load", headers={"Authorization": f"Bearer {ADMIN}"}
            )
    assert r.status_code == 403
    assert r.json()["error"].startswith("explicit model control is off")
