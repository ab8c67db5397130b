"""The compute process's own side (`python -m service.engine.compute_child <fd>`): it builds
the server's models again from the same bundles and settings, runs the batches it is sent, and
says it is alive four times a second from a thread of its own.

It ignores SIGINT and SIGTERM (the server drains first), exits when the socket closes, and is
killed by the kernel if the server dies (PR_SET_PDEATHSIG), so it never outlives the server. The
server's side, which starts, feeds, watches and restarts it, is `worker.py`.

Frames: 8 bytes of length, then a pickle of (id, op, args) one way and (id, ok, value) back.
Pickle is safe here: both ends are this program, over a socket pair no one else holds.
"""

from __future__ import annotations

import gc
import logging
import os
import pickle
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, fields
from typing import Any

from service.engine import cancels, frozen, progress
from service.engine.compute import Outcome, Work, run, warm
from service.engine.model import ServedModel
from service.engine.registry import ModelFactory
from service.engine.sampler import SamplerStats
from service.errors import BundleChangedError, BundleError

log = logging.getLogger("mcserve.worker")
HEADER = 8
# The child says it is alive this often, from a thread of its own, whatever it computes or
# loads; the server kills a child silent for its stall limit while it holds calls (worker.py).
HEARTBEAT_S = 0.25
HEARTBEAT = -1  # the frame id of a heartbeat
Key = tuple[str, str, str]  # name, version, digest
_COUNTERS = [f.name for f in fields(SamplerStats) if not f.name.startswith("_")]


@dataclass(frozen=True)
class WorkerSpec:
    """What the child needs to build the models the server built."""

    factory: ModelFactory
    threads: int  # torch intra-op threads, as the server would have used


def key_of(model: ServedModel) -> Key:
    return (model.name, model.version, model.digest)


def frame(obj: object) -> bytes:
    data = pickle.dumps(obj, protocol=5)
    return len(data).to_bytes(HEADER, "big") + data


class _Child:
    def __init__(self) -> None:
        self.spec: WorkerSpec | None = None
        self.models: dict[Key, ServedModel] = {}

    def hello(self, spec: WorkerSpec, flags: tuple[str, int] | None = None) -> int:
        from service.engine.device import configure_threads

        self.spec = spec
        configure_threads(spec.threads)
        if flags is not None:  # the server's cancel flags, inherited by descriptor
            cancels.attach(*flags)
        return os.getpid()

    def prepare(self, key: Key, path: os.PathLike[str]) -> None:
        self._load(key, path)

    def _load(self, key: Key, path: os.PathLike[str]) -> ServedModel:
        assert self.spec is not None
        if self.models.pop(key, None) is not None:  # a copy it holds (a moved version): else
            frozen.collect_released()  # overwritten below, frozen, and never collected
        try:  # the digest pinned: what the server checked is what the process loads
            model = self.spec.factory(path, key[2])  # type: ignore[arg-type]
        except BundleError:
            model = None
        if (
            model is None or key_of(model) != key
        ):  # 503 with the fix; the server's copy stays as it was
            # Named by its key, not its path: the client sees this (no server paths).
            log.error("bundle changed on disk", extra={"path": str(path), "key": key})
            raise BundleChangedError(
                f"model '{key[0]}' version '{key[1]}': the bundle on disk is not the one the "
                "server loaded (its files changed or went after the server read them); restore "
                "them, or load that version again"
            )
        warm(model)
        self.models[key] = model
        frozen.freeze()  # what loading left is long-lived (see app.py), and, as there, young
        gc.set_threshold(50_000, *gc.get_threshold()[1:])  # collections every 50,000 objects
        return model

    def release(self, key: Key) -> None:
        if self.models.pop(key, None) is not None:
            frozen.collect_released()  # its load froze it: else never collected

    def compute(
        self, key: Key, path: os.PathLike[str], works: list[Work]
    ) -> tuple[list[Outcome], dict[str, int]]:
        model = self.models.get(key) or self._load(key, path)
        stats = model.sampler.stats
        before = [getattr(stats, n) for n in _COUNTERS]
        progress.begin()  # judged by its forwards from here (progress.py), not while loading
        try:
            results = run(model, works)
        finally:
            progress.end()
        counts = {n: getattr(stats, n) - b for n, b in zip(_COUNTERS, before, strict=True)}
        return [_portable(r) for r in results], counts


def _portable(value: Outcome) -> Outcome:
    """An exception that would not survive pickling becomes one that does, with its text."""
    if isinstance(value, BaseException):
        try:
            pickle.loads(pickle.dumps(value))
        except Exception:
            return RuntimeError(f"{type(value).__name__}: {value}")
    return value


def _die_with_parent() -> None:
    """Linux: SIGKILL when the server dies, even if this process hangs and never reads EOF."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not glibc: end of input still ends it


def main(fd: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server drains, then closes the socket
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent()
    fmt = "%(asctime)s %(levelname)s %(name)s %(message)s"
    logging.basicConfig(level=logging.WARNING, format=fmt)
    child = _Child()
    stream = socket.socket(fileno=fd).makefile("rwb")
    writing = threading.Lock()  # answers and heartbeats: whole frames, one at a time
    threading.Thread(target=_heartbeat, args=(stream, writing), daemon=True).start()
    while True:
        head = stream.read(HEADER)
        if len(head) < HEADER:
            return  # the server closed the socket: stop
        ident, op, args = pickle.loads(stream.read(int.from_bytes(head, "big")))
        try:
            value: object = getattr(child, op)(*args)
            ok = True
        except BaseException as exc:  # a library's panic too (pyo3): it ended the process
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            value, ok = _portable(exc), False
        try:
            out = frame((ident, ok, value))
        except Exception as exc:  # an answer that cannot travel fails its batch, not the child
            out = frame((ident, False, RuntimeError(f"unpicklable result: {exc}")))
        try:
            with writing:
                stream.write(out)
                stream.flush()
        except (BrokenPipeError, ConnectionResetError):
            return  # the server stopped waiting (its drain ran out) and closed the socket


def _heartbeat(stream: Any, writing: threading.Lock) -> None:
    """Say "alive" every HEARTBEAT_S, whatever the main thread does (it releases the GIL in
    torch and numpy, and Python switches threads every 5 ms otherwise), with whether a batch is
    being computed and how many forwards have run (progress.py: a stuck main thread)."""
    while True:
        time.sleep(HEARTBEAT_S)
        beat = frame((HEARTBEAT, True, (progress.computing, progress.forwards)))
        try:
            with writing:
                stream.write(beat)
                stream.flush()
        except (OSError, ValueError):  # the socket closed: the main loop ends the process
            return


if __name__ == "__main__":
    main(int(sys.argv[1]))
