"""The audit writer process: turns messages into rows and commits them, outside the server.

Why a process: the server's event loop is bound by Python's GIL. Building rows and binding them
to SQL in a thread of the server took about 25 us of that GIL per record, and a thread waiting
for the GIL delays the event loop by up to a switch interval; under load that cost more than
the work itself (docs/BENCHMARKS.md, "Audit trail"). In this process it costs the server only
the pickling of compact messages.

Protocol over a private socket pair, one pickled tuple per frame (`multiprocessing.connection`
framing); the parent speaks first and the child answers every frame:

    parent                                  child
    {"url", "path", "inputs", "hmac_key", ...}  ("ready", description) | ("error", text)
    ("write", [message, ...])               ("ok", written, [(index, why)])
                                            | ("error", text, timed_out)
    ("close",)                              ("closed",)

A batch is acknowledged only after its transaction committed, so the parent keeps it queued
until then. The child ends when the parent closes the socket or dies (end of file), never on a
terminal's Ctrl-C (it has its own session): the server flushes the queue through it first.
"""

from __future__ import annotations

import pickle
import signal
import subprocess
import sys
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from service.audit.backend import open_store
from service.audit.rows import Message, RowContext, RowError, row
from service.audit.store import Store, StoreError, StoreTimeout
from service.child import spawn


class SinkClient:
    """The server's handle on its writer process; used from one thread at a time."""

    def __init__(self, url: str | None, path: Path, config: dict[str, Any]) -> None:
        self.url, self.path = url, path
        self.config = {"url": url, "path": str(path), **config}
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None and self._conn is not None

    def start(self) -> str:
        """Start the process; it opens and migrates the store. Returns the store's description."""
        self.kill()
        # Its own session: a terminal's Ctrl-C reaches the server, which decides when this ends.
        self._proc, parent = spawn("service.audit.sink", new_session=True)
        self._conn = Connection(parent.detach())
        reply = self._call(self.config)
        if reply[0] != "ready":
            self.kill()
            raise StoreError(reply[1])
        return str(reply[1])

    def write(self, messages: list[Message]) -> tuple[int, list[tuple[int, str]]]:
        """Commit one batch; (rows written, [(index, why) of messages that made no row])."""
        if not self.alive:
            self.start()
        reply = self._call(("write", messages))
        if reply[0] != "ok":
            raise (StoreTimeout if reply[2:3] == (True,) else StoreError)(reply[1])
        return int(reply[1]), list(reply[2])

    def close(self, timeout_s: float = 10.0) -> None:
        if self.alive:
            try:
                self._call(("close",))
                assert self._proc is not None
                self._proc.wait(timeout_s)
            except (StoreError, subprocess.TimeoutExpired):
                pass
        self.kill()

    def interrupt(self) -> None:
        """From another thread: end the process, so that a `write` blocked on it fails now."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()

    def kill(self) -> None:
        """End the process and drop the socket (on the thread that uses this client)."""
        proc, conn = self._proc, self._conn
        self._proc = self._conn = None
        if proc is not None and proc.poll() is None:
            proc.kill()
        if proc is not None:
            proc.wait()
        if conn is not None:
            conn.close()

    def _call(self, request: Any) -> tuple[Any, ...]:
        conn = self._conn
        if conn is None:
            raise StoreError("the audit writer process is not running")
        try:
            conn.send_bytes(pickle.dumps(request, protocol=pickle.HIGHEST_PROTOCOL))
            reply: tuple[Any, ...] = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError) as exc:
            code = self._proc.poll() if self._proc is not None else None
            self.kill()
            raise StoreError(
                f"the audit writer process ended (exit status {code}); it is restarted for the "
                f"next batch ({type(exc).__name__})"
            ) from exc
        return reply


def _describe(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, StoreError | RowError) else f"{type(exc).__name__}: {exc}"


Invalid = list[tuple[int, str]]  # (index of a message in its batch, why it made no row)


def write(store: Store, messages: list[Message], ctx: RowContext) -> tuple[int, Invalid]:
    """Commit the rows of `messages`: (rows written, [(index, why) of messages that made no
    row]). A message that cannot be a row, or whose row the database refuses for its values,
    is reported, not retried forever (it would hold back every record queued behind it)."""
    rows: dict[str, list[dict[str, Any]]] = {"audit_records": [], "audit_feedback": []}
    index: dict[str, list[int]] = {"audit_records": [], "audit_feedback": []}
    invalid: Invalid = []
    for i, msg in enumerate(messages):
        try:
            table, values = row(msg, ctx)
        except Exception as exc:
            invalid.append((i, _describe(exc)))
            continue
        rows[table].append(values)
        index[table].append(i)
    rejected = store.append(rows["audit_records"], rows["audit_feedback"])
    invalid += [(index[r.table][r.row], r.why) for r in rejected]
    written = len(rows["audit_records"]) + len(rows["audit_feedback"]) - len(rejected)
    return written, sorted(invalid)


def serve(conn: Connection) -> int:
    def reply(*value: Any) -> None:
        conn.send_bytes(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))

    try:
        cfg = pickle.loads(conn.recv_bytes())
    except EOFError:
        return 0
    ctx = RowContext(cfg["inputs"], cfg["hmac_key"], cfg["software"], cfg["replica"])
    store: Store | None = None
    try:
        store = open_store(cfg["url"], Path(cfg["path"]), cfg.get("store_timeout_s", 5.0))
        store.migrate()
    except Exception as exc:
        if store is not None:
            store.close()
        reply("error", _describe(exc))
        return 1
    reply("ready", store.description)
    try:
        while True:
            try:
                request = pickle.loads(conn.recv_bytes())
            except EOFError:  # the server is gone: nothing more will come
                return 0
            if request[0] == "close":
                reply("closed")
                return 0
            try:
                written, invalid = write(store, request[1], ctx)
            except Exception as exc:
                reply("error", _describe(exc), isinstance(exc, StoreTimeout))
                continue
            reply("ok", written, invalid)
    finally:
        store.close()


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server decides when this process ends
    with Connection(int(argv[0])) as conn:
        return serve(conn)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
