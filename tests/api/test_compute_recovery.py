"""The compute process restarted after it died or hung (service/engine/worker.py `_recover`,
lifecycle.prepare_all): unready until one child holds every served model, a pause that grows
while children die young, and a child stuck with the GIL released found by its progress.

The child's behaviour is changed through a `sitecustomize` module on its PYTHONPATH (the
server's own interpreter is already running, so it is untouched): it records each model it
warms, and waits or exits there when a flag file exists."""

from __future__ import annotations

import gc
import os
import signal
import time
import weakref
from pathlib import Path

import pytest
from apps import asgi_client, running
from test_batching import body, state, until

from service.engine import worker
from service.engine.worker import RESTART_PAUSE_S, ComputeProcess
from service.settings import Settings

HOOK = """
import os, time
import service.engine.compute as compute

def _warm(model, _warm=compute.warm):
    with open(os.environ["MCSERVE_TEST_LOADS"], "a") as f:
        f.write(f"{os.getpid()} {model.name}\\n")
    die = os.environ["MCSERVE_TEST_DIE"]
    if os.path.exists(die):  # once: the next child loads
        os.unlink(die)
        os._exit(3)
    bad = os.environ["MCSERVE_TEST_BAD"]  # "exit NAME" or "raise NAME": that model, always
    if os.path.exists(bad):
        how, name = open(bad).read().split()
        if model.name == name and how == "exit":
            os._exit(3)
        if model.name == name:
            raise RuntimeError("poisoned warm-up of " + name)
    return _warm(model)

def _run(model, works, _run=compute.run):
    if os.path.exists(os.environ["MCSERVE_TEST_STICK"]):
        time.sleep(3600)  # the GIL released, as a lock or a native call waiting for ever
    return _run(model, works)

compute.warm, compute.run = _warm, _run
"""


@pytest.fixture(autouse=True)
def short_pauses(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tenth of the pauses between restarts (1, 2, 4, 8 s: 15 s of sleep in the three-deaths
    test), but where the pause itself is what a test checks."""
    if "growing_pause" not in request.node.name:
        monkeypatch.setattr(worker, "RESTART_PAUSE_S", RESTART_PAUSE_S / 10)


@pytest.fixture
def files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOOK)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]))
    names = {
        "loads": tmp_path / "loads.txt",
        "die": tmp_path / "die",
        "stick": tmp_path / "stick",
        "bad": tmp_path / "bad",
    }
    for k, path in names.items():
        monkeypatch.setenv(f"MCSERVE_TEST_{k.upper()}", str(path))
    return names


def _loads(path: Path) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for line in path.read_text().splitlines():
        pid, name = line.split()
        out.setdefault(int(pid), []).append(name)
    return out


def _settings(repo: Path, stuck_s: float = 600.0) -> Settings:
    return Settings(model_dir=repo, max_instances=50, compute_process=True, compute_stuck_s=stuck_s)


def _remote(app: object) -> ComputeProcess:
    r = state(app).remote  # type: ignore[arg-type]
    assert r is not None and r.proc is not None
    return r


async def test_a_second_death_while_loading_is_not_ready_with_models_missing(
    repo: Path, files: dict[str, Path]
) -> None:
    """The child that replaced a dead one died while loading the first model: the next model's
    load started a third child by itself, which loaded only that one, and the replica said
    ready (review R19). Ready now means one child took every served model."""
    async with running(_settings(repo)) as app, asgi_client(app) as c:
        r = _remote(app)
        served = sorted(e.name for e in state(app).registry.entries() if e.ready)
        assert len(served) >= 2
        files["die"].touch()  # the next child dies at its first load
        os.kill(r.proc.pid, signal.SIGKILL)  # type: ignore[union-attr]
        await until(lambda: not r.alive)
        await until(lambda: r.not_ready_reason() is None, timeout=90.0)
        assert (await c.get("/readyz")).status_code == 200
        loads = _loads(files["loads"])
        assert r.proc is not None and sorted(loads[r.proc.pid]) == served, loads
        assert not files["die"].exists()  # a child did die on the way


async def test_a_model_loaded_during_a_recovery_is_served_after_it(
    repo: Path, files: dict[str, Path]
) -> None:
    """A load while the child restarted was refused for good ("the compute process is
    restarting"), a required model kept /readyz at 503 until the server restarted (review
    R21). The recovery, which waits for the load's lock, loads it into the new child."""
    async with running(_settings(repo)) as app, asgi_client(app) as c:
        r, control = _remote(app), app.state.model_control
        assert await control.unload("reg") == 1
        os.kill(r.proc.pid, signal.SIGKILL)  # type: ignore[union-attr]
        await until(lambda: not r.alive)
        assert r.not_ready_reason() is not None  # recovering
        [entry] = await control.load("reg")
        assert entry.ready, entry.error
        await until(lambda: r.not_ready_reason() is None, timeout=90.0)
        assert (await c.get("/readyz")).status_code == 200
        answer = await c.post("/v1/models/reg:predict", json=body(5, [0.0, 0.0, 0.0]))
        assert answer.status_code == 200, answer.text
        assert r.proc is not None and "reg" in _loads(files["loads"])[r.proc.pid]


@pytest.mark.parametrize("how", ["exit", "raise"])
async def test_a_version_loaded_during_a_recovery_that_cannot_warm_is_refused(
    repo: Path, files: dict[str, Path], how: str
) -> None:
    """A version loaded while the child restarted, whose warm-up then killed every new child,
    kept the recovery (and the replica: /readyz 503, every model 503) going for ever; one whose
    warm-up raised was refused but counted, /readyz 503 for good, its reason cut to the
    exception's name (review R22). Refused with its reason, as a load outside a recovery is,
    and the replica serves the rest."""
    async with running(_settings(repo)) as app, asgi_client(app) as c:
        r, control = _remote(app), app.state.model_control
        assert await control.unload("reg") == 1
        files["bad"].write_text(f"{how} reg")
        os.kill(r.proc.pid, signal.SIGKILL)  # type: ignore[union-attr]
        await until(lambda: not r.alive)
        [entry] = await control.load("reg")
        assert entry.ready  # not this version's fault yet: the recovery warms it
        assert entry.model is not None
        copy = weakref.ref(entry.model)
        del entry
        await until(lambda: r.not_ready_reason() is None, timeout=90.0)
        await until(lambda: not control._tasks)
        gc.collect()
        assert copy() is None  # its copy is freed (a traceback kept it, frozen: review R23)
        [refused] = state(app).registry.versions("reg")
        assert not refused.ready and refused.error is not None
        said = "warm-up ended a new" if how == "exit" else "RuntimeError: poisoned warm-up of reg"
        assert refused.error.startswith("compute process: ") and said in refused.error
        assert (await c.get("/readyz")).status_code == 200  # reg never counted
        ok = await c.post("/v1/models/clf:predict", json=body(5, [0.0, 0.0, 0.0, 0.0]))
        assert ok.status_code == 200, ok.text


async def test_a_version_unloaded_before_the_recovery_warmed_it_counts_again_later(
    repo: Path, files: dict[str, Path]
) -> None:
    """Loaded during a recovery and unloaded before the recovery warmed it, its key stayed
    deferred: loaded again later it never counted for readiness, and /readyz said 200 with
    it refused (review R23)."""
    async with running(_settings(repo)) as app:
        r, control, st = _remote(app), app.state.model_control, state(app)
        assert await control.unload("reg") == 1
        os.kill(r.proc.pid, signal.SIGKILL)  # type: ignore[union-attr]
        await until(lambda: not r.alive)
        await control.load("reg")
        assert control._deferred  # loaded while restarting
        assert await control.unload("reg") == 1
        assert not control._deferred
        await until(lambda: r.not_ready_reason() is None, timeout=90.0)
        [entry] = await control.load("reg")
        assert entry.ready and "reg" in st.counted


async def test_a_served_version_that_ends_every_new_child_is_refused_after_three(
    repo: Path, files: dict[str, Path]
) -> None:
    """A version served for a while whose warm-up then killed every new child took the
    replica down for good: the recovery retried for ever, and no log named it (review R23).
    After three deaths in a row loading it, it is refused and the rest is served."""
    async with running(_settings(repo)) as app, asgi_client(app) as c:
        r = _remote(app)
        files["bad"].write_text("exit reg")
        os.kill(r.proc.pid, signal.SIGKILL)  # type: ignore[union-attr]
        await until(lambda: not r.alive)
        await until(lambda: r.not_ready_reason() is None, timeout=120.0)
        [refused] = state(app).registry.versions("reg")
        assert not refused.ready
        assert refused.error == "compute process: its warm-up ended 3 new compute processes"
        ok = await c.post("/v1/models/clf:predict", json=body(5, [0.0, 0.0, 0.0, 0.0]))
        assert ok.status_code == 200, ok.text


async def test_a_child_that_dies_young_is_restarted_after_a_growing_pause(
    repo: Path, files: dict[str, Path]
) -> None:
    """Each recovery started its child within 0.04 s of the last one's death, however often it
    died, reloading every model each time (review R19)."""
    async with running(_settings(repo)) as app, asgi_client(app) as c:
        r = _remote(app)
        old = r.proc
        os.kill(old.pid, signal.SIGKILL)  # type: ignore[union-attr]
        await until(lambda: r.starts == 2 and r.not_ready_reason() is None, timeout=90.0)
        died = time.monotonic()
        os.kill(r.proc.pid, signal.SIGKILL)  # type: ignore[union-attr]  # lived seconds
        await until(lambda: not r.alive)
        # A request meanwhile is answered 503 at once, and starts no child of its own: that
        # bypassed the pause and reloaded every model (review R20).
        busy = await c.post("/v1/models/clf:predict", json=body(5, [0.0, 0.0, 0.0, 0.0]))
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1", busy.text
        assert "restarting" in busy.json()["error"] and r.starts == 2
        await until(lambda: r.starts == 3, timeout=90.0)
        assert time.monotonic() - died >= RESTART_PAUSE_S
        await until(lambda: r.not_ready_reason() is None, timeout=90.0)
        again = await c.post("/v1/models/clf:predict", json=body(5, [0.0, 0.0, 0.0, 0.0]))
        assert again.status_code == 200 and r.starts == 3, again.text


async def test_a_stuck_main_thread_is_killed_and_replaced(
    repo: Path, files: dict[str, Path]
) -> None:
    """The heartbeat comes from a thread of its own: it beat on while the main thread waited
    for ever with the GIL released, and the child's requests were held until their deadlines
    (or for ever), readiness 200. A batch whose forwards stop for the stall limit is stuck
    (progress.py): killed, what it held answers 503, a new child is started."""
    async with running(_settings(repo, stuck_s=1.5)) as app, asgi_client(app) as c:
        r = _remote(app)
        ok = await c.post("/v1/models/clf:predict", json=body(5, [0.0, 0.0, 0.0, 0.0]))
        assert ok.status_code == 200, ok.text
        starts = r.starts
        files["stick"].touch()
        began = time.monotonic()
        stuck = body(6, [0.0, 0.0, 0.0, 0.0])
        stuck["parameters"]["timeout_ms"] = 15_000.0  # before the fix: a 504 after 15 s
        held = await c.post("/v1/models/clf:predict", json=stuck)
        assert held.status_code == 503, held.text
        assert time.monotonic() - began < 15.0  # 1.5 s after its last forward; slack for CI
        assert held.json()["error"].startswith("the compute process stopped")
        files["stick"].unlink()
        await until(lambda: r.not_ready_reason() is None, timeout=60.0)
        again = await c.post("/v1/models/clf:predict", json=body(6, [0.0, 0.0, 0.0, 0.0]))
        assert again.status_code == 200, again.text
        assert r.starts == starts + 1


def test_an_onnx_run_counts_as_progress(repo: Path) -> None:
    """A deterministic request on ONNX Runtime counted no forward: under a low stuck limit a
    healthy child was killed for it (review R20)."""
    import numpy as np

    from service.bundle.load import load_bundle
    from service.engine import progress
    from service.engine.model import ServedModel

    model = ServedModel(load_bundle(repo / "clf" / "1"), device="cpu")
    assert model.onnx is not None
    before = progress.forwards
    model.onnx.predict(np.zeros((3, 4), dtype=np.float32))
    assert progress.forwards == before + 1
