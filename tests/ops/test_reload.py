"""Reload under load: versions come and go while 16 clients keep sending; nothing fails."""

from __future__ import annotations

import asyncio
import gc
import json
import shutil
import weakref
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI

from service.api.app import create_app
from service.api.common.auth import hash_key
from service.engine.summaries import SummaryError
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


async def test_repository_routes_without_an_admin_key_say_what_to_configure(repo: Path) -> None:
    """With no admin key configured they answered 401 "missing API key", though no key could
    ever do."""
    app = create_app(Settings(model_dir=repo, model_control="explicit"))  # no keys at all
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            r = await c.post("/v2/repository/index")
    assert r.status_code == 403
    assert r.json()["error"] == (
        'repository routes need an admin key, and none is configured: add one with "admin": '
        "true to MCSERVE_API_KEYS"
    )


async def test_a_retired_model_is_freed(repo: Path, tmp_path: Path) -> None:
    """Start-up freezes what it loaded (gc.freeze, against latency spikes): a model unloaded
    later stayed in memory for good, its reference cycles out of the collector's reach."""
    root = tmp_path / "repo"
    shutil.copytree(repo / "clf", root / "clf")
    app = create_app(Settings(model_dir=root, model_control="explicit"))
    async with app.router.lifespan_context(app):
        st = app.state.mcserve
        model = st.registry.versions("clf")[0].model
        assert model is not None
        gone = weakref.ref(model), weakref.ref(model.sampler.module)  # the module: in cycles
        del model
        assert await app.state.model_control.unload("clf") == 1
        gc.collect()
        assert [ref() for ref in gone] == [None, None]


async def test_a_warm_up_failure_refuses_that_version_only(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the compute process a warm-up error escaped the lifespan: the server did not
    start, the healthy models with it (one broken bundle never stops the others)."""
    from service.api.common import lifecycle

    def warm(model: Any) -> None:
        if model.name == "clf":
            raise SummaryError("logits contain NaN or infinite values")

    monkeypatch.setattr(lifecycle, "warm", warm)
    app = create_app(Settings(model_dir=repo, compute_process=False))
    async with app.router.lifespan_context(app):
        entries = {e.name: e for e in app.state.mcserve.registry.entries()}
    assert not entries["clf"].ready
    assert entries["clf"].error == "warm-up: logits contain NaN or infinite values"
    assert all(e.ready for name, e in entries.items() if name != "clf")


async def test_a_refused_version_is_tried_again_once_mended(repo: Path, tmp_path: Path) -> None:
    """A version refused once (here: copied without its weights) stayed refused for good, in
    both modes: polling and an explicit load took any registered path as loaded."""
    root = tmp_path / "repo"
    shutil.copytree(repo / "clf", root / "clf")
    weights = next((root / "clf" / "1").glob("*.safetensors"))
    kept = weights.read_bytes()
    weights.unlink()
    admin = {"Authorization": f"Bearer {ADMIN}"}
    keys = [ApiKey(id="admin", sha256=hash_key(ADMIN), admin=True)]
    for control in ("poll", "explicit"):
        if weights.exists():
            weights.unlink()
        app = create_app(
            Settings(model_dir=root, model_control=control, poll_interval_s=0.05, api_keys=keys)
        )
        async with app.router.lifespan_context(app):
            registry = app.state.mcserve.registry
            [entry] = registry.versions("clf")
            assert not entry.ready and "missing" in (entry.error or "")
            if control == "explicit":  # still refused: an error, not a 200 with ready false
                transport = httpx.ASGITransport(app=app)
                async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                    r = await c.post("/v2/repository/models/clf/load", headers=admin)
                assert r.status_code == 503
                assert (
                    r.json()["error"].startswith(
                        "model 'clf' failed to load, no version is ready: version 1: "
                    )
                    and "missing" in r.json()["error"]
                )
            if control == "poll":  # unchanged files: not read again at each poll
                await asyncio.sleep(0.2)
                assert registry.versions("clf")[0] is entry
            weights.write_bytes(kept)
            if control == "explicit":
                transport = httpx.ASGITransport(app=app)
                async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                    r = await c.post("/v2/repository/models/clf/load", headers=admin)
                assert r.json()["loaded"] == [{"version": "1", "ready": True, "reason": None}]
            for _ in range(200):
                if registry.versions("clf")[0].ready:
                    break
                await asyncio.sleep(0.02)
            assert [e.ready for e in registry.versions("clf")] == [True], control


async def test_a_repository_body_that_is_not_json_says_where(repo: Path) -> None:
    """FastAPI's error put the character position where a field's name goes ("14: JSON decode
    error"); the routes now read their body themselves and say what the parser says."""
    keys = [ApiKey(id="admin", sha256=hash_key(ADMIN), admin=True)]
    app = create_app(Settings(model_dir=repo, model_control="explicit", api_keys=keys))
    headers = {"Authorization": f"Bearer {ADMIN}", "content-type": "application/json"}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            r = await c.post(
                "/v2/repository/models/clf/unload", content=b'{"parameters":', headers=headers
            )
    assert r.status_code == 400, r.text
    assert r.json()["error"] == (
        "invalid request: body: not JSON (unexpected end of data: line 1 column 15 (char 14))"
    )


async def test_a_copy_that_ends_during_the_refused_load_is_tried_again(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The files were looked at after the load: a copy that ended while it ran looked unchanged
    from then on, and the version stayed refused for good."""
    from service.engine.registry import Registry

    root = tmp_path / "repo"
    shutil.copytree(repo / "clf", root / "clf")
    weights = next((root / "clf" / "1").glob("*.safetensors"))
    kept = weights.read_bytes()
    weights.unlink()
    build = Registry.build

    def build_then_copy_ends(self: Registry, *args: Any) -> Any:
        entry = build(self, *args)  # refused: the weights are not there yet
        monkeypatch.setattr(Registry, "build", build)
        weights.write_bytes(kept)  # ... and the copy completes while the load is busy
        return entry

    monkeypatch.setattr(Registry, "build", build_then_copy_ends)
    app = create_app(Settings(model_dir=root, model_control="poll", poll_interval_s=0.05))
    async with app.router.lifespan_context(app):
        registry = app.state.mcserve.registry
        for _ in range(200):
            if registry.versions("clf")[0].ready:
                break
            await asyncio.sleep(0.02)
        assert [e.ready for e in registry.versions("clf")] == [True]


async def test_a_mended_unversioned_bundle_replaces_its_refused_entry(
    repo: Path, tmp_path: Path
) -> None:
    """A bundle straight under its model's folder, refused, is listed as version '?': once it
    loads as its manifest's version, the '?' entry goes (else a ghost version stays listed)."""
    root = tmp_path / "repo"
    shutil.copytree(repo / "clf" / "1", root / "clf")
    weights = next((root / "clf").glob("*.safetensors"))
    kept = weights.read_bytes()
    weights.unlink()
    app = create_app(Settings(model_dir=root, model_control="poll", poll_interval_s=0.05))
    async with app.router.lifespan_context(app):
        registry = app.state.mcserve.registry
        assert [(e.version, e.ready) for e in registry.versions("clf")] == [("?", False)]
        weights.write_bytes(kept)
        for _ in range(200):
            if any(e.ready for e in registry.versions("clf")):
                break
            await asyncio.sleep(0.02)
        assert [(e.version, e.ready) for e in registry.versions("clf")] == [("1", True)]


async def test_a_version_moved_to_the_versioned_layout_retires_its_old_copy(
    repo: Path, tmp_path: Path
) -> None:
    """clf/ (version 1 straight under it) moved to clf/1/: the new copy's batcher replaced the
    old one under the same key without stopping it, and the old entry's metrics stayed (a
    reviewer's suspicion, confirmed by reading); the old copy serves until the new one is in
    (retired first, the model was briefly not served)."""
    root = tmp_path / "repo"
    shutil.copytree(repo / "clf" / "1", root / "clf")
    app = create_app(Settings(model_dir=root, model_control="poll", poll_interval_s=0.05))
    async with app.router.lifespan_context(app):
        state = app.state.mcserve
        old = weakref.ref(state.batchers[("clf", "1")])  # not held here: it must be freed
        copy = weakref.ref(state.batchers[("clf", "1")].model.sampler.module)  # frozen at load

        def stopped() -> bool:
            b = old()
            return b is None or (b._task is None and b._closing)

        staged = tmp_path / "staged"
        shutil.copytree(root / "clf", staged)
        for f in list((root / "clf").iterdir()):
            f.unlink()
        staged.rename(root / "clf" / "1")
        gap = 0  # polls that found no ready version: it serves until the new one is in
        for _ in range(500):
            entries = state.registry.versions("clf")
            gap += not any(e.ready for e in entries)
            if entries and entries[0].path == root / "clf" / "1" and stopped():
                break
            await asyncio.sleep(0.002)
        assert gap == 0
        assert [(e.version, e.path, e.ready) for e in state.registry.versions("clf")] == [
            ("1", root / "clf" / "1", True)
        ]
        assert state.batchers[("clf", "1")] is not old()
        assert stopped()  # stopped, not left running
        gc.collect()
        assert copy() is None  # the old copy stayed in memory for good (reviewer LC)


async def test_unloading_a_model_takes_every_version_out_before_any_drains(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Newest first, one at a time: while version 2 drained, requests without a version went
    to version 1, which was unloaded next (reviewer LC). A request that chose a version just
    before it went is told that, not that the server is shutting down."""
    from service.engine.batcher import Batcher
    from service.engine.params import PredictParams
    from service.errors import ShuttingDownError

    root = tmp_path / "repo"
    shutil.copytree(repo / "clf", root / "clf")
    add_version(root, "2")
    app = create_app(Settings(model_dir=root, model_control="explicit"))
    seen: list[list[str]] = []
    stop = Batcher.stop

    async def watched(self: Batcher, *args: Any, **kwargs: Any) -> None:
        seen.append([e.version for e in app.state.mcserve.registry.versions("clf")])
        await stop(self, *args, **kwargs)

    monkeypatch.setattr(Batcher, "stop", watched)
    async with app.router.lifespan_context(app):
        retired = app.state.mcserve.batchers[("clf", "2")]
        assert await app.state.model_control.unload("clf") == 2
        assert seen == [[], []]
        with pytest.raises(ShuttingDownError) as e:
            retired.enqueue(
                np.zeros((1, 4), np.float32),
                PredictParams(samples=20, confidence=(0.95,)),
            )
        assert e.value.message == (
            "model 'clf' version '2' was unloaded while this request was read; send it again "
            "(without a version it goes to a ready one)"
        )


async def test_a_model_that_appears_broken_later_does_not_make_the_server_unready(
    repo: Path, tmp_path: Path
) -> None:
    """A copy half done (its manifest alone) of a new model made /readyz 503 until it was
    complete, or for good if it stayed broken, on every replica sharing the volume (reviewer
    LC). A model never ready that appeared after start-up does not count; one present at
    start-up still does."""
    root = tmp_path / "repo"
    shutil.copytree(repo / "clf", root / "clf")
    app = create_app(Settings(model_dir=root, model_control="poll", poll_interval_s=0.05))
    async with app.router.lifespan_context(app):
        state = app.state.mcserve
        (root / "late" / "1").mkdir(parents=True)
        (root / "late" / "1" / "manifest.json").write_text("{")  # the first file a cp writes
        for _ in range(200):
            if state.registry.versions("late"):
                break
            await asyncio.sleep(0.02)
        assert not state.registry.versions("late")[0].ready
        assert state.not_ready_reasons() == []
    app = create_app(Settings(model_dir=root, model_control="poll", poll_interval_s=0.05))
    async with app.router.lifespan_context(app):  # present at start-up: it counts
        reasons = app.state.mcserve.not_ready_reasons()
        assert len(reasons) == 1 and reasons[0].startswith("model 'late': ")
    # Ready once after start-up, then refused: it counts, whether or not a probe came between
    # (the set was updated by /readyz calls only; review R10).
    shutil.rmtree(root / "late")
    app = create_app(Settings(model_dir=root, model_control="explicit"))
    async with app.router.lifespan_context(app):
        control, state = app.state.model_control, app.state.mcserve
        shutil.copytree(repo / "clf" / "1", root / "late" / "1")
        manifest = json.loads((root / "late" / "1" / "manifest.json").read_text())
        manifest["name"] = "late"
        (root / "late" / "1" / "manifest.json").write_text(json.dumps(manifest))
        assert [e.ready for e in await control.load("late")] == [True]
        assert "late" in state.counted  # at its load, no probe asked
        # Gone from the repository, then back half copied: not counted until ready again
        # (a redeploy by delete and copy made every replica unready, R11).
        await control.unload("late")
        (root / "late" / "1" / "manifest.json").write_text("{")
        assert [e.ready for e in await control.load("late")] == [False]
        assert state.not_ready_reasons() == []
    # Broken at start-up, one of its two versions removed: still counted (R13: any retirement
    # of a model with no ready version dropped it, and the replica said ready).
    for v in ("1", "2"):
        (root / "bad" / v).mkdir(parents=True)
        (root / "bad" / v / "manifest.json").write_text("{")
    app = create_app(Settings(model_dir=root, model_control="explicit"))
    async with app.router.lifespan_context(app):
        assert await app.state.model_control.unload("bad", "1") == 1
        assert [r for r in app.state.mcserve.not_ready_reasons() if "'bad'" in r]
    shutil.rmtree(root / "bad")
    # Delete and copy seen by one poll: the half copy loads (refused) before the old version
    # retires, so the model still had a version; it stayed counted (review R12).
    app = create_app(Settings(model_dir=root, model_control="poll", poll_interval_s=3600))
    async with app.router.lifespan_context(app):
        control, state = app.state.model_control, app.state.mcserve
        shutil.rmtree(root / "clf" / "1")
        (root / "clf" / "3").mkdir()
        (root / "clf" / "3" / "manifest.json").write_text("{")
        await control.sync()
        assert [(e.version, e.ready) for e in state.registry.versions("clf")] == [("3", False)]
        assert not [r for r in state.not_ready_reasons() if "'clf'" in r]


async def test_a_version_the_restarted_compute_process_cannot_load_is_refused(
    repo: Path, tmp_path: Path
) -> None:
    """Version 2's files removed, then the compute process restarted: it loads lazily from
    disk, could not, and every request of version 2 was a 503 for good while /readyz and the
    index called it ready, and requests without a version never moved to version 1 (reviewer
    LC). The version is refused as if it had failed to load."""
    import os
    import signal

    root = tmp_path / "repo"
    shutil.copytree(repo / "clf", root / "clf")
    add_version(root, "2")
    settings = Settings(model_dir=root, model_control="explicit", compute_process=True)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        st = app.state.mcserve
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as c:
            r = await c.post("/v1/models/clf:predict", json=BODY)
            assert r.status_code == 200 and r.json()["model"]["version"] == "2"
            [copy] = [weakref.ref(e.model.sampler.module) for e in st.registry.versions("clf")][1:]
            shutil.rmtree(root / "clf" / "2")
            proc = st.remote.proc
            os.kill(proc.pid, signal.SIGKILL)
            for _ in range(250):
                if not st.remote.alive:
                    break
                await asyncio.sleep(0.02)
            lost = await c.post("/v1/models/clf:predict", json=BODY)
            assert lost.status_code == 503  # while the new process loads the served versions
            assert lost.json()["error"].startswith("the compute process is restarting")
            for _ in range(3000):  # the recovery tries version 2 and refuses it
                if not st.registry.versions("clf")[-1].ready:
                    break
                await asyncio.sleep(0.02)
            refused = st.registry.versions("clf")[-1]
            assert not refused.ready and refused.error is not None
            assert refused.error.startswith("model 'clf' version '2': the bundle on disk")
            del refused
            for _ in range(3000):  # and then finishes, version 1 loaded
                if st.remote.not_ready_reason() is None:
                    break
                await asyncio.sleep(0.02)
            r = await c.post("/v1/models/clf:predict", json=BODY)
            assert r.status_code == 200 and r.json()["model"]["version"] == "1"
            ready = await c.get("/v2/models/clf/versions/2/ready")
            assert ready.status_code == 503
            assert st.not_ready_reasons() == []  # version 1 serves the model
            for _ in range(250):  # the refusal's last step frees the copy
                if not app.state.model_control._tasks:
                    break
                await asyncio.sleep(0.02)
            gc.collect()
            assert copy() is None  # the refused copy is freed, as an unloaded one (R10)


async def test_versions_that_sort_alike_and_a_non_ascii_digit(repo: Path, tmp_path: Path) -> None:
    """A directory named '²' ('²'.isdigit(), and int('²') failed) took start-up down, and a poll
    after it broke polling for good; '010' and '10' sorted alike, the newest being whichever
    came last (a restart could serve the other)."""
    from service.engine.registry import Entry, Registry, version_key

    root = tmp_path / "repo"
    shutil.copytree(repo / "clf", root / "clf")
    shutil.copytree(root / "clf" / "1", root / "clf" / "²")  # refused: its manifest says 1
    app = create_app(Settings(model_dir=root, model_control="poll", poll_interval_s=0.1))
    async with app.router.lifespan_context(app):
        versions = app.state.mcserve.registry.versions("clf")
        assert [e.version for e in versions] == ["1", "²"] and not versions[1].ready
        add_version(root, "2")
        for _ in range(500):  # the poll goes on
            if ("clf", "2") in app.state.mcserve.batchers:
                break
            await asyncio.sleep(0.02)
        assert [e.version for e in app.state.mcserve.registry.versions("clf")] == ["1", "2", "²"]
    assert version_key("010") < version_key("10")
    for order in (("010", "10"), ("10", "010")):
        reg = Registry(root, lambda p: None)  # type: ignore[arg-type,return-value]
        for v in order:
            reg.add(Entry("m", v, root))
        assert [e.version for e in reg.versions("m")] == ["010", "10"]


async def test_a_v2_body_that_arrives_after_an_unload_is_answered_by_the_next_version(
    repo: Path, tmp_path: Path
) -> None:
    """/v2 took its batcher before reading the body: version 2 unloaded while the body came
    answered 503 "the server is shutting down", where version 1 could answer (/v1 did)."""
    root = tmp_path / "repo"
    shutil.copytree(repo / "clf", root / "clf")
    add_version(root, "2")
    admin = {"Authorization": f"Bearer {ADMIN}"}
    keys = [ApiKey(id="admin", sha256=hash_key(ADMIN), admin=True)]
    app = create_app(Settings(model_dir=root, model_control="explicit", api_keys=keys))
    body = json.dumps(
        {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32",
                     "data": [0.1, 0.2, 0.3, 0.4]}], "parameters": {"samples": 20}}
    ).encode()  # fmt: skip
    gate = asyncio.Event()

    async def slowly() -> Any:
        yield body[:10]
        await gate.wait()
        yield body[10:]

    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as c:
            headers = admin | {"content-type": "application/json"}
            sent = asyncio.ensure_future(
                c.post("/v2/models/clf/infer", content=slowly(), headers=headers)
            )
            await asyncio.sleep(0.2)  # the head is in, the body is not
            r = await c.post(
                "/v2/repository/models/clf/unload", headers=admin,
                json={"parameters": {"version": "2"}},
            )  # fmt: skip
            assert r.status_code == 200 and r.json()["unloaded_versions"] == 1
            await asyncio.sleep(0.2)  # past the retired batcher's settle time
            gate.set()
            answer = await sent
    assert answer.status_code == 200, answer.text
    assert answer.json()["model_version"] == "1"


async def test_a_served_version_replaced_on_disk_is_said_once(
    repo: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Versions are immutable; one replaced in place went on serving its old digest, silently
    (or was reloaded, if a poll fell between the two renames)."""
    root = tmp_path / "repo"
    shutil.copytree(repo / "clf", root / "clf")
    app = create_app(Settings(model_dir=root, model_control="poll", poll_interval_s=0.05))
    said = "a served version changed on disk and is not reloaded"
    async with app.router.lifespan_context(app):
        report = root / "clf" / "1" / "evaluation" / "report.json"
        report.parent.mkdir()
        report.write_text("{}")  # a report beside a served version: meant to come later
        await asyncio.sleep(0.3)
        assert not any(said in r.getMessage() for r in caplog.records)
        manifest = root / "clf" / "1" / "manifest.json"
        manifest.write_bytes(manifest.read_bytes())  # rewritten in place: new times
        for _ in range(200):
            if any(said in r.getMessage() for r in caplog.records):
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)  # more polls: said once
    assert sum(said in r.getMessage() for r in caplog.records) == 1


async def test_the_index_lists_unloaded_versions_and_reads_ready(
    repo: Path, tmp_path: Path
) -> None:
    """After an unload the version vanished from /v2/repository/index (Triton lists it,
    UNAVAILABLE "unloaded": a client finds what it may load); {"ready": true} was ignored; and
    GET /v2 did not name the model_repository extension."""
    root = tmp_path / "repo"
    shutil.copytree(repo / "clf", root / "clf")
    add_version(root, "2")
    keys = [ApiKey(id="admin", sha256=hash_key(ADMIN), admin=True)]
    app = create_app(Settings(model_dir=root, model_control="explicit", api_keys=keys))
    admin = {"Authorization": f"Bearer {ADMIN}"}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            assert "model_repository" in (await c.get("/v2", headers=admin)).json()["extensions"]
            body = {"parameters": {"version": "1"}}
            await c.post("/v2/repository/models/clf/unload", json=body, headers=admin)
            index = (await c.post("/v2/repository/index", headers=admin)).json()
            ready = await c.post("/v2/repository/index", json={"ready": True}, headers=admin)
            bad = await c.post("/v2/repository/index", json={"ready": "yes"}, headers=admin)
    rows = {(r["name"], r["version"]): (r["state"], r["reason"]) for r in index}
    assert rows == {("clf", "2"): ("READY", ""), ("clf", "1"): ("UNAVAILABLE", "unloaded")}
    assert [(r["name"], r["version"]) for r in ready.json()] == [("clf", "2")]
    assert bad.status_code == 400
    plain = create_app(Settings(model_dir=root))
    async with plain.router.lifespan_context(plain):
        transport = httpx.ASGITransport(app=plain, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            assert (await c.get("/v2")).json()["extensions"] == ["binary_tensor_data"]
