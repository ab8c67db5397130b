"""Model lifecycle: load, warm and attach new versions; retire removed ones without dropping.

Order matters for atomic switches: a version is loaded and warmed and its batcher started
before it is registered, so a request without a version moves to it in one step; a retired
version is unregistered first (new requests go elsewhere or get 404), and its batcher drains
what it already holds before it stops.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from service.api.common.child_copies import ChildCopies, Key
from service.api.common.state import AppState
from service.engine import frozen
from service.engine.batcher import Batcher
from service.engine.compute import warm
from service.engine.compute_child import key_of
from service.engine.model import ServedModel
from service.engine.registry import Entry, discover
from service.errors import (
    McServeError,
    ModelNotFoundError,
)
from service.metrics import Metrics

log = logging.getLogger("mcserve.lifecycle")


Signature = tuple[tuple[str, int, int, int, int], ...]


def signature(path: Path, files_only: bool = False) -> Signature:
    """The version directory's entries (name, size, times, inode): what a change shows in.
    `files_only`: its files, not its folders (a served version's `evaluation/` report is meant
    to be added later: it is matched by digest)."""
    try:
        entries = [f for f in path.iterdir() if not files_only or f.is_file()]
        return tuple(sorted((f.name, *_stat(f)) for f in entries))
    except OSError:
        return ()


def _is(e: Entry, version: str, digest: str) -> bool:
    return e.version == version and e.model is not None and e.model.digest == digest


async def _collect() -> None:
    """After versions were freed: stopped batchers' tasks are still referred to by the loop's
    callbacks until its next turn; then start-up's freeze is undone for what they held, else
    it is never collected (frozen.py)."""
    await asyncio.sleep(0)
    frozen.collect_released()


def _stat(f: Path) -> tuple[int, int, int, int]:
    st = f.lstat()  # ctime and inode too: a file put back with its old size and mtime (cp -p)
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


class ModelControl(ChildCopies):
    def __init__(self, st: AppState, metrics: Metrics | None = None) -> None:
        self.st = st
        self.metrics = metrics
        self._lock = asyncio.Lock()  # one repository change at a time
        # A refused bundle's files as they were: polling tries it again once they change (a
        # half-copied version loads when the copy is done), not every interval.
        self._refused: dict[Path, Signature] = {}
        # A served version's files as loaded: a change is said once (versions are immutable;
        # one replaced in place went on serving its old digest without a word).
        self._served: dict[Path, Signature] = {}
        self._tasks: set[asyncio.Future[None]] = set()  # refusals scheduled from batchers
        # Versions loaded while the compute process restarted, not yet warmed in any child:
        # the recovery's prepare_all warms them, and only then do they count for readiness.
        self._deferred: set[Key] = set()
        self._deaths: dict[Key, int] = {}  # child_copies.py: deaths while loading, in a row

    def _attach(self, model: ServedModel) -> None:
        s = self.st.settings
        b = Batcher(
            model,
            self.st.executor,
            max_batch_rows=s.max_batch_rows,
            max_queue_rows=s.max_queue_rows,
            max_delay_s=s.max_delay_ms / 1000.0,
            batching=s.batching,
            remote=self.st.remote,
            slice_rows=s.slice_rows,
            turn_ms=s.turn_ms,
        )
        if self.metrics is not None:
            m = self.metrics
            m.add_model(
                model.name,
                model.version,
                model.digest,
                "torch",
                model.device,
                lambda: float(b.queued_rows),
            )
            b.on_batch = lambda rows, secs: m.observe_batch(model.name, rows, secs)
            b.on_result = lambda pred, inputs: m.observe_result(model.name, pred, inputs)
        key = (model.name, model.version, model.digest)  # not the model: tasks would hold it
        b.on_changed = lambda why: self._later(self._refuse_served(key, why))
        b.start()
        self.st.batchers[(model.name, model.version)] = b

    async def _load(self, name: str, version: str | None, path: Path) -> Entry:
        loop = asyncio.get_running_loop()
        files = signature(path)  # before reading: a copy that ends during the load is a change
        entry = await loop.run_in_executor(
            self.st.executor, self.st.registry.build, name, version, path
        )
        key = (entry.name, entry.version)
        # The same version in another directory (unversioned -> versioned layout): it serves
        # until this one is in, then goes (its batcher was replaced, never stopped).
        moved = [e for e in self.st.registry.versions(entry.name) if e.version == entry.version]
        moved = [e for e in moved if e.path != path]
        old_batcher = self.st.batchers.get(key) if moved else None
        if entry.model is not None and self.st.remote is None:
            try:
                await loop.run_in_executor(self.st.executor, warm, entry.model)
            except Exception as exc:  # this version is refused; the others still load
                reason = exc.message if isinstance(exc, McServeError) else type(exc).__name__
                log.warning("warm-up failed", extra={"model": name, "reason": reason})
                entry = Entry(entry.name, entry.version, entry.path, error=f"warm-up: {reason}")
        entry = await self._prepare_remote(entry)  # with the process, it warms its own copy
        if entry.model is not None:
            self._attach(entry.model)
            default, limit = entry.model.manifest.defaults.samples, self.st.settings.max_samples
            if default > limit:  # every request that sends no samples would be a 422
                log.warning(
                    "model's default samples over max_samples",
                    extra={"model": name, "samples": default, "max_samples": limit},
                )
            rows = self.st.settings.max_queue_rows
            if min(default, limit) > rows:  # one instance by default would be a 413
                log.warning(
                    "model's default samples over max_queue_rows",
                    extra={"model": name, "samples": default, "max_queue_rows": rows},
                )
        stale = [e for e in self.st.registry.entries() if e.path == path and e is not entry]
        self.st.registry.add(entry)
        if moved:  # taken from the list: no reference stays for the collection after
            while moved:
                await self._moved_away(moved.pop(), old_batcher, entry)
            old_batcher = None
            await _collect()  # the old copy stayed in memory for good (reviewer LC)
        for old in stale:  # a refused entry of this directory under another version ("?")
            if (old.name, old.version) != (entry.name, entry.version):
                self.st.registry.unload(old.name, old.version)
        if entry.ready:
            self._refused.pop(path, None)
            self._served[path] = signature(path, files_only=True)
            if self._warmed(entry):  # a deferred one counts once the recovery warmed it
                self.st.counted.add(entry.name)  # counts for readiness from now on (state.py)
        else:
            self._refused[path] = files
        log.info(
            "model loaded" if entry.ready else "model refused",
            extra={"model": entry.name, "version": entry.version, "reason": entry.error},
        )
        return entry

    def _later(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)  # held until done: a task with no reference may be collected
        task.add_done_callback(self._tasks.discard)

    async def _refuse_served(self, key: Key, why: str) -> None:
        """A restarted compute process could not load `key`'s copy again (its files changed or
        went since the server read them, or its warm-up failed there): refuse that version, as
        if it had failed to load, so that requests without a version go to a ready one and
        readiness says so. It answered 503 for good while the index and /readyz called it
        ready (reviewer LC)."""
        async with self._lock:
            await self._refuse_locked(key, why)

    async def _refuse_locked(self, key: Key, why: str) -> None:
        """`_refuse_served`, the lock held."""
        name, version, digest = key
        versions = self.st.registry.versions(name)
        entry = next((e for e in versions if _is(e, version, digest)), None)
        if entry is None:  # already unloaded or replaced
            return
        log.error("served version refused by the compute process", extra={"reason": why})
        refused = Entry(entry.name, entry.version, entry.path, error=why)
        self.st.registry.add(refused)
        batcher = self.st.batchers.get((entry.name, entry.version))
        await self._free(entry, batcher, reason=why)
        self._refused[entry.path] = signature(entry.path)  # tried again once mended
        del entry, batcher, versions  # then the copy can go
        await _collect()

    async def _moved_away(self, old: Entry, batcher: Batcher | None, new: Entry) -> None:
        """Free what `old` held that `new` (same name and version, now in the registry) does
        not: its batcher, and its compute-process copy and metrics unless the files are the
        same (both keyed by name, version and digest)."""
        digests = {e.model.digest if e.model is not None else None for e in (old, new)}
        await self._free(old, batcher, keep=len(digests) == 1 and None not in digests)

    async def _free(
        self, entry: Entry, batcher: Batcher | None, keep: bool = False, reason: str = ""
    ) -> None:
        """Stop `batcher` (dropped from the table if it is still this entry's; what it still
        holds is told `reason`, else that the version was unloaded) and forget the entry's
        files; unless `keep`, release its compute-process copy and metrics."""
        self._refused.pop(entry.path, None)
        self._served.pop(entry.path, None)
        key = (entry.name, entry.version)
        if batcher is not None:  # a request that chose it before it went is told so
            reason = reason or (
                f"model '{entry.name}' version '{entry.version}' was unloaded while this "
                "request was read; send it again (without a version it goes to a ready one)"
            )
            await batcher.stop(drain=True, reason=reason)
            if self.st.batchers.get(key) is batcher:
                self.st.batchers.pop(key)
        if entry.model is None or keep:
            return
        self._deferred.discard(key_of(entry.model))  # a stale key kept a reload uncounted (R23)
        if self.st.remote is not None:
            await self.st.remote.release(entry.model)
        if self.metrics is not None:
            m = entry.model
            self.metrics.remove_model(m.name, m.version, m.digest, "torch", m.device)

    async def sync(self) -> None:
        """Make the loaded set equal the repository on disk (start-up and polling)."""
        async with self._lock:
            found = {
                path: (name, version) for name, version, path in discover(self.st.registry.root)
            }
            known = self.st.registry.paths()
            for path, (name, version) in found.items():
                if self.st.draining:  # a SIGTERM while loading: the pod is going, stop here
                    log.info("loading stopped: the server is shutting down")
                    return
                self._changed(path)
                refused = self._refused.get(path)
                if path not in known or (refused is not None and refused != signature(path)):
                    await self._load(name, version, path)
            gone = [e for e in self.st.registry.entries() if e.path not in found]
            await self._retire_all(gone)

    def _changed(self, path: Path) -> None:
        """Warn, once per change, that a served version's files changed on disk."""
        was = self._served.get(path)
        if was is None:
            return
        now = signature(path, files_only=True)
        if now != was:
            self._served[path] = now
            log.warning(
                "a served version changed on disk and is not reloaded: bundle versions are "
                "immutable; write a new version (or unload and load this one)",
                extra={"path": str(path)},
            )

    async def load(self, name: str) -> list[Entry]:
        """Explicit control: load every version of `name` found on disk and not yet loaded."""
        async with self._lock:
            ready = {e.path for e in self.st.registry.entries() if e.ready}
            todo = [(n, v, p) for n, v, p in discover(self.st.registry.root) if n == name]
            if not todo:
                raise ModelNotFoundError(f"model '{name}' is not in the repository on disk")
            # refused versions are tried again: the operator may have mended them
            return [await self._load(n, v, p) for n, v, p in todo if p not in ready]

    async def unload(self, name: str, version: str | None = None) -> int:
        """Explicit control: retire every version of `name`, or just `version`."""
        async with self._lock:
            entries = self.st.registry.versions(name)
            if version is not None:
                entries = [e for e in entries if e.version == version]
            if not entries:
                what = f"model '{name}'" + (f" version '{version}'" if version else "")
                raise ModelNotFoundError(f"{what} is not loaded")
            count = len(entries)
            await self._retire_all(entries)
            return count

    async def _retire_all(self, entries: list[Entry]) -> None:
        """Retire each: every one out of the registry first (unloading a model newest version
        first sent its unversioned requests to the older one while the newer drained), then
        free what they held (taken from the list: no reference stays)."""
        if not entries:
            return
        batchers = []
        for entry in entries:
            self.st.registry.unload(entry.name, entry.version)
            batchers.append(self.st.batchers.get((entry.name, entry.version)))
            left = self.st.registry.versions(entry.name)
            if not left or (entry.ready and not any(self._warmed(e) for e in left)):
                # Gone, or its last ready version went with only a copy half done left (a
                # delete and copy seen by one poll, R12): it counts again once one is ready
                # (R11). A model never ready, found at start-up, still counts (R13).
                self.st.counted.discard(entry.name)
        while entries:
            entry, batcher = entries.pop(), batchers.pop()
            await self._free(entry, batcher)
            log.info("model retired", extra={"model": entry.name, "version": entry.version})
            del entry, batcher
        await _collect()

    async def poll_forever(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.sync()
            except Exception:  # polling must survive a bad moment on disk
                log.exception("repository poll failed")
