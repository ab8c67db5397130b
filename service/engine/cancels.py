"""Flags that tell a running compute its client went away, in the compute process too.

The compute checks a request's flag between chunks of passes (`rows.RowMap.stopped`), as it
checks its deadline: a client that disconnects stops what is left of its compute. The compute
process (worker.py) cannot see the server's connections, and while it computes it reads no
messages, so the flags live in memory both processes map: an anonymous file of `SLOTS` bytes
(memfd on Linux, else an unlinked temporary file) whose descriptor the compute process inherits.
It has no name, so nothing is left behind when a server is killed.

A request takes the next slot of a ring; a slot holds 0, or the mark of the request that set it
(1-255 by the ring's lap), so a late cancel of an old request never stops a newer one that took
its slot: that needs the two 65,536 x 255 requests apart with the old one still waiting.
Without flags (the file could not be made: logged) requests are simply not cancellable mid-way.
"""

from __future__ import annotations

import itertools
import logging
import mmap
import os
import tempfile
import threading
from dataclasses import dataclass

SLOTS = 1 << 16
_MAPS: dict[str, mmap.mmap] = {}  # key -> this process's view
_LOCK = threading.Lock()
_KEYS = itertools.count()
log = logging.getLogger("mcserve.engine")


@dataclass(frozen=True)
class Flag:
    """One request's flag: which flags, the slot, and the mark that means "stop"."""

    key: str
    slot: int
    mark: int

    def is_set(self) -> bool:
        view = _MAPS.get(self.key)
        return view is not None and view[self.slot] == self.mark


class Flags:
    """The server's side: slots handed out in turn; `fd` is what a compute process inherits."""

    def __init__(self) -> None:
        self.key = f"{os.getpid()}-{next(_KEYS)}"
        self.fd = _anonymous(SLOTS)
        self._map = mmap.mmap(self.fd, SLOTS)
        _MAPS[self.key] = self._map
        self._next = itertools.count()

    def take(self) -> Flag:
        n = next(self._next)
        slot, lap = n % SLOTS, n // SLOTS
        self._map[slot] = 0
        return Flag(self.key, slot, lap % 255 + 1)

    def set(self, flag: Flag) -> None:
        if flag.key == self.key and not self._map.closed:
            self._map[flag.slot] = flag.mark

    def close(self) -> None:
        _MAPS.pop(self.key, None)
        self._map.close()
        os.close(self.fd)


def _anonymous(size: int) -> int:
    """A descriptor of `size` zero bytes that no path names."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("mcserve-cancel", os.MFD_CLOEXEC)  # pass_fds hands it on
    else:
        with tempfile.TemporaryFile() as f:  # unlinked at once on POSIX
            fd = os.dup(f.fileno())
    try:
        os.ftruncate(fd, size)
    except OSError:
        os.close(fd)
        raise
    return fd


_SHARED: list[Flags | None] = []


def shared() -> Flags | None:
    """This server process's flags, made on first use; None if they cannot be (logged)."""
    with _LOCK:
        if not _SHARED:
            try:
                _SHARED.append(Flags())
            except OSError as exc:
                log.warning("no cancel flags (%s): a request runs on after its client goes", exc)
                _SHARED.append(None)
        return _SHARED[0]


def attach(key: str, fd: int) -> None:
    """In the compute process: map the server's flags from the descriptor it inherited."""
    with _LOCK:
        if key not in _MAPS:
            _MAPS[key] = mmap.mmap(fd, SLOTS, access=mmap.ACCESS_READ)
    os.close(fd)
