"""Flags that tell a running compute its client went away, in the compute process too.

The compute checks a request's flag between chunks of passes (`rows.RowMap.stopped`), as it
checks its deadline: a client that disconnects stops what is left of its compute. The compute
process (worker.py) cannot see the server's connections, and while it computes it reads no
messages, so the flags live in memory both processes map: a file of `SLOTS` bytes, in /dev/shm
where there is one (memory, not disk), created by the server and read by the compute.

A request takes the next slot of a ring; a slot holds 0, or the mark of the request that set it
(1-255 by the ring's lap), so a late cancel of an old request never stops a newer one that took
its slot: that needs the two 65,536 x 255 requests apart with the old one still waiting.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import mmap
import os
import tempfile
import threading
from dataclasses import dataclass

SLOTS = 1 << 16
_MAPS: dict[str, mmap.mmap] = {}  # path -> this process's view
_LOCK = threading.Lock()


@dataclass(frozen=True)
class Flag:
    """One request's flag: where it lives and the mark that means "stop"."""

    path: str
    slot: int
    mark: int

    def is_set(self) -> bool:
        view = _view(self.path)
        return view is not None and view[self.slot] == self.mark


class Flags:
    """The server's side: one file per server process (`shared()`), slots handed out in turn."""

    def __init__(self) -> None:
        where = "/dev/shm" if os.path.isdir("/dev/shm") else None
        fd, self.path = tempfile.mkstemp(prefix="mcserve-cancel-", dir=where)
        try:
            os.ftruncate(fd, SLOTS)
            self._map = mmap.mmap(fd, SLOTS)
        finally:
            os.close(fd)
        _MAPS[self.path] = self._map
        self._next = itertools.count()

    def take(self) -> Flag:
        n = next(self._next)
        slot, lap = n % SLOTS, n // SLOTS
        self._map[slot] = 0
        return Flag(self.path, slot, lap % 255 + 1)

    def set(self, flag: Flag) -> None:
        if flag.path == self.path and not self._map.closed:
            self._map[flag.slot] = flag.mark

    def close(self) -> None:
        _MAPS.pop(self.path, None)
        self._map.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


_SHARED: Flags | None = None


def shared() -> Flags:
    """This server process's flags (made on first use, removed at exit)."""
    global _SHARED
    with _LOCK:
        if _SHARED is None:
            _SHARED = Flags()
            atexit.register(_SHARED.close)
        return _SHARED


def _view(path: str) -> mmap.mmap | None:
    """The flags file as this process maps it (read-only where another process made it);
    None when it is gone (its server stopped: nothing to cancel)."""
    view = _MAPS.get(path)
    if view is not None:
        return view
    with _LOCK:
        try:
            with open(path, "rb") as f:
                view = mmap.mmap(f.fileno(), SLOTS, access=mmap.ACCESS_READ)
        except (OSError, ValueError):
            return None
        _MAPS[path] = view
        return view
