"""Helpers for hostile-bundle tests: a Python audit hook that records what a load does, and a
way to rewrite a bundle's files and re-pin them in its manifest (what an attacker who can write
the model directory, but not the server's configuration, can do)."""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

# Audit events that mean code from a bundle ran: processes, sockets, and files opened to write.
_PROCESS = ("os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "subprocess.Popen")
_SOCKET = ("socket.connect", "socket.bind", "socket.sendto", "socket.getaddrinfo")
_WRITE_FLAGS = ("w", "a", "x", "+")


class _Watch:
    active = False
    seen: ClassVar[list[tuple[str, str]]] = []
    opened: ClassVar[list[str]] = []


def _hook(event: str, args: tuple[Any, ...]) -> None:
    if not _Watch.active:
        return
    if event.startswith(_PROCESS) or event in _SOCKET:
        _Watch.seen.append((event, repr(args)[:200]))
    elif event == "open":
        path, mode, flags = (*args, None, None, None)[:3]
        writing = isinstance(mode, str) and any(c in mode for c in _WRITE_FLAGS)
        if isinstance(flags, int) and flags & 0o3:  # O_WRONLY / O_RDWR
            writing = True
        if writing:
            _Watch.seen.append((event, repr(args)[:200]))
        elif isinstance(path, str | bytes | Path):
            _Watch.opened.append(str(path if not isinstance(path, bytes) else path.decode()))


sys.addaudithook(_hook)  # once per process; inert unless a `watching()` block is active


@contextmanager
def watching() -> Iterator[_Watch]:
    """Record forbidden events (and every file opened for reading) inside the block."""
    _Watch.seen, _Watch.opened = [], []
    _Watch.active = True
    try:
        yield _Watch
    finally:
        _Watch.active = False


def repin(bundle: Path, *names: str, role: str | None = None) -> None:
    """Write each file's sha256 and size into the manifest (adding it with `role` if new)."""
    mf = bundle / "manifest.json"
    data = json.loads(mf.read_text())
    for name in names:
        raw = (bundle / name).read_bytes()
        entry = data["artifacts"].setdefault(name, {"role": role})
        entry["sha256"] = hashlib.sha256(raw).hexdigest()
        entry["size"] = len(raw)
    mf.write_text(json.dumps(data))


def edit_json(path: Path, change: Any) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def string_leaves(data: Any, at: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Paths to every string in a JSON document: values, and keys of objects."""
    if isinstance(data, dict):
        for k, v in data.items():
            yield (*at, ("key", k))
            yield from string_leaves(v, (*at, k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield from string_leaves(v, (*at, i))
    elif isinstance(data, str):
        yield at


def replace_at(data: Any, path: tuple[Any, ...], value: str) -> None:
    """Set the string at `path` (from `string_leaves`) to `value`, renaming keys in place."""
    node = data
    for step in path[:-1]:
        node = node[step]
    last = path[-1]
    if isinstance(last, tuple):  # a key: rename it, keeping its value
        node[value] = node.pop(last[1])
    else:
        node[last] = value
