"""The compute process's copies of the served versions (worker.py runs the process).

A version is warmed in the compute process before it is ready (`_prepare_remote`). After the
process died and was restarted, the recovery loads every served version into the new one
(`prepare_all`) before the replica is ready again. A version loaded while the process restarts
is deferred: registered, loaded by the recovery, counted for readiness only once warmed there.
A version the new process cannot load is refused (`ModelControl._refuse_locked`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from service.api.common.state import AppState
from service.engine.compute_child import key_of
from service.engine.registry import Entry
from service.errors import (
    BundleChangedError,
    ComputeRestartingError,
    ComputeUnavailableError,
    McServeError,
)

log = logging.getLogger("mcserve.lifecycle")  # ModelControl's log: one story per load
Key = tuple[str, str, str]  # name, version, digest
DEATHS = 3  # new processes a served version may end while loading before it is refused


class ChildCopies:
    """ModelControl's part that keeps the compute process's copies (a mixin of it)."""

    st: AppState
    _lock: asyncio.Lock  # ModelControl's: one repository change at a time
    _deferred: set[Key]  # loaded during a restart, not yet warmed in any process
    # Served versions a new process died loading, in a row: the one in flight is blamed
    # after DEATHS (it took the replica down for good, retried for ever: review R23).
    _deaths: dict[Key, int]

    if TYPE_CHECKING:

        async def _refuse_locked(self, key: Key, why: str) -> None: ...

    async def prepare_all(self) -> None:
        """A new compute process (its child died) loads every served version before the replica
        is ready again. Under the lock: a version unloaded meanwhile is not loaded into the
        child after its release. A version the new process cannot load (its files changed
        since the server read them, its warm-up fails there) is refused with the reason, and so
        is one loaded during the recovery, never warmed, whose load kills the child; the child
        dying on another goes up, and worker.py's recovery tries again."""
        async with self._lock:
            refuse, died = await self._prepare_each()
            for key, why in refuse:  # the loop's references gone: a refused copy can go
                self._deferred.discard(key)
                self._deaths.pop(key, None)
                await self._refuse_locked(key, why)
            if died is not None:
                raise died  # the recovery starts over (a refused version is not tried again)

    async def _prepare_each(
        self,
    ) -> tuple[list[tuple[Key, str]], ComputeUnavailableError | None]:
        """Each ready version into the compute process: (those to refuse and why, the error
        of a child that died on the way)."""
        assert self.st.remote is not None
        refuse: list[tuple[Key, str]] = []
        for entry in self.st.registry.entries():
            if entry.model is None or not entry.ready:
                continue
            key = key_of(entry.model)
            try:
                await self.st.remote.prepare(entry.model)
            except ComputeUnavailableError as exc:  # the new child died, loading this one
                n = self._deaths[key] = self._deaths.get(key, 0) + 1
                log.warning(
                    "compute process died loading a model",
                    extra={"model": key[0], "version": key[1], "deaths": n},
                )
                if key in self._deferred or n >= DEATHS:  # never warmed, or every time: its
                    ended = "a new compute process" if n == 1 else f"{n} new compute processes"
                    refuse.append((key, f"compute process: its warm-up ended {ended}"))
                # No traceback: its frames held the model, frozen by the refusal's collection.
                return refuse, exc.with_traceback(None)
            except BundleChangedError as exc:  # its files changed: said as a batch says it
                refuse.append((key, exc.message))
                continue
            except Exception as exc:  # it cannot load there (its warm-up fails): refused
                refuse.append((key, f"compute process: {_reason(exc)}"))
                continue
            self._deaths.pop(key, None)
            if key in self._deferred:  # warmed at last: it counts for readiness
                self._deferred.discard(key)
                self.st.counted.add(entry.name)
        return refuse, None

    def _warmed(self, entry: Entry) -> bool:
        """Ready, and loaded into a compute process (not deferred): what counts for readiness."""
        return entry.ready and (entry.model is None or key_of(entry.model) not in self._deferred)

    async def _prepare_remote(self, entry: Entry) -> Entry:
        """The compute process loads and warms its own copy before the model is ready."""
        if self.st.remote is None or entry.model is None:
            return entry
        try:
            await self.st.remote.prepare(entry.model)
        except ComputeRestartingError:
            # Not this version's fault: the recovery, which waits for this lock, loads it into
            # the new process (it was refused for good: review R21); not counted till then.
            self._deferred.add(key_of(entry.model))
            return entry
        except Exception as exc:
            reason = _reason(exc)
            log.warning("compute process refused the model", extra={"reason": reason})
            return Entry(entry.name, entry.version, entry.path, error=f"compute process: {reason}")
        return entry


def _reason(exc: Exception) -> str:
    """Why the compute process refused a version: our message, or the error and its text."""
    return exc.message if isinstance(exc, McServeError) else f"{type(exc).__name__}: {exc}"
