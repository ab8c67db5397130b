"""Model listings respect a key's scope, and failure reasons shown to clients carry no server
paths (issue 27, finding 8); the operator's CLI keeps the full reason."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from typer.testing import CliRunner

from service.api.app import create_app
from service.api.common.auth import hash_key
from service.cli import app as cli
from service.engine.registry import without_paths
from service.settings import ApiKey, Settings

KEYS = {"all": "k-all-1", "reg": "k-reg-2", "admin": "k-admin-3", "reg-admin": "k-radm-4"}


@pytest.fixture(scope="module")
def scoped_repo(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """clf and reg, and 'broken': a copy of clf whose manifest names another model."""
    root = tmp_path_factory.mktemp("scoped") / "deep" / "server" / "models"
    for name in ("clf", "reg"):
        shutil.copytree(repo / name, root / name)
    shutil.copytree(repo / "clf", root / "broken")
    return root


@pytest_asyncio.fixture(scope="module")
async def client(scoped_repo: Path) -> AsyncIterator[httpx.AsyncClient]:
    keys = [
        ApiKey(id="all", sha256=hash_key(KEYS["all"])),
        ApiKey(id="reg", sha256=hash_key(KEYS["reg"]), models=["reg"]),
        ApiKey(id="admin", sha256=hash_key(KEYS["admin"]), admin=True),
        ApiKey(id="reg-admin", sha256=hash_key(KEYS["reg-admin"]), admin=True, models=["reg"]),
    ]
    settings = Settings(model_dir=scoped_repo, api_keys=keys, model_control="explicit")
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            yield c


def key(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


async def test_listings_show_only_the_models_of_the_key(client: httpx.AsyncClient) -> None:
    listed = (await client.get("/v1/models", headers=key("reg"))).json()["models"]
    assert [m["name"] for m in listed] == ["reg"]
    listed = (await client.get("/v1/models", headers=key("all"))).json()["models"]
    assert [m["name"] for m in listed] == ["broken", "clf", "reg"]
    index = (await client.post("/v2/repository/index", headers=key("reg-admin"))).json()
    assert [e["name"] for e in index] == ["reg"]
    index = (await client.post("/v2/repository/index", headers=key("admin"))).json()
    assert [e["name"] for e in index] == ["broken", "clf", "reg"]
    # a scoped admin key may not load or unload the models outside its scope either
    r = await client.post("/v2/repository/models/clf/load", headers=key("reg-admin"))
    assert r.status_code == 403 and r.json()["error"] == (
        "API key 'reg-admin' may not use model 'clf'"
    )
    r = await client.post("/v2/repository/models/reg/load", headers=key("reg-admin"))
    assert r.status_code == 200, r.text


async def test_failure_reasons_carry_no_server_paths(
    client: httpx.AsyncClient, scoped_repo: Path
) -> None:
    server_paths = [str(scoped_repo), str(scoped_repo.parent), "deep/server"]
    listed = (await client.get("/v1/models", headers=key("all"))).json()["models"]
    [reason] = [v["reason"] for m in listed if m["name"] == "broken" for v in m["versions"]]
    assert reason == "broken/1: manifest says clf/1, directory says broken/1; they must agree"
    index = await client.post("/v2/repository/index", headers=key("admin"))
    metadata = await client.get("/v1/models/broken", headers=key("all"))
    assert metadata.status_code == 503
    ready = await client.get("/readyz")  # open to anyone: 'broken' keeps the server unready
    assert ready.status_code == 503 and "broken/1: manifest says" in ready.text
    v2_ready = await client.get("/v2/health/ready")
    for r in (index, metadata, ready, v2_ready):
        assert "manifest says clf/1" in r.text
        assert not [p for p in server_paths if p in r.text], r.text


def test_the_operators_cli_keeps_the_full_reason(scoped_repo: Path) -> None:
    out = CliRunner().invoke(cli, ["models", "--model-dir", str(scoped_repo)])
    assert out.exit_code == 2
    assert f"{scoped_repo / 'broken' / '1'}: manifest says clf/1" in out.stdout


@pytest.mark.parametrize(
    "reason, expected",
    [
        ("/srv/m/diabetes/1: manifest says x", "diabetes/1: manifest says x"),
        ("No such file: '/opt/data/w.safetensors'", "No such file: 'w.safetensors'"),
        ("/etc/x/: odd", "(a path): odd"),
        # the root only as a whole path, not inside another one
        ("/data/srv/m/x", "x"),
        # not server paths: a route, a URL
        ("see /v1/models/x and http://host/a/b", "see /v1/models/x and http://host/a/b"),
    ],
)
def test_without_paths(reason: str, expected: str) -> None:
    assert without_paths(reason, Path("/srv/m")) == expected
