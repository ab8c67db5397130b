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

Every call has a deadline (`answer_within`), longer than the store's own deadlines can add up
to: a child that stopped making progress (stopped, or blocked in a SQLite file on a disk or
mount that hangs: sqlite3 has no deadline) is killed, the call fails as a timeout, and the next
batch starts a new child. Like a child that dies, one killed after its commit and before its
answer has its batch written twice, never lost.
"""

from __future__ import annotations

import pickle
import signal
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from service.audit.backend import open_store
from service.audit.postgres import PostgresStore
from service.audit.rows import Message, RowContext, RowError, row
from service.audit.store import Store, StoreError, StoreTimeout
from service.child import spawn

CONNECT_S = 5.0  # PostgresStore's connect_timeout
# Opening the store: a migration waits up to PostgresStore.MIGRATE_TIMEOUT_S for another's.
START_S = CONNECT_S + 1.5 * PostgresStore.MIGRATE_TIMEOUT_S


def answer_within(store_timeout_s: float, nbytes: int) -> float:
    """How long the writer process may take to answer a batch of `nbytes` (pickled) before it is
    taken for stalled. PostgreSQL bounds each of its calls by 1.5 times the store's timeout, and
    one batch makes at most three (once.py's look-up, the batch, the batch again in parts): 4.5
    times, after a connection; 6 times leaves room. Plus 1 s per MiB, for a slow disk (SQLite
    has no deadline of its own). 35 s for a small batch with the default 5 s."""
    return CONNECT_S + 6 * store_timeout_s + nbytes / 2**20


class SinkClient:
    """The server's handle on its writer process; used from one thread at a time."""

    def __init__(self, url: str | None, path: Path, config: dict[str, Any]) -> None:
        self.url, self.path = url, path
        self.config = {"url": url, "path": str(path), **config}
        self.store_timeout_s = float(config.get("store_timeout_s", 5.0))
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
        reply = self._call(self.config, START_S)
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
                self._call(("close",), timeout_s)
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

    def _call(self, request: Any, seconds: float | None = None) -> tuple[Any, ...]:
        """Send `request`, return the answer; the process is killed when none came within
        `seconds` (default: `answer_within` the request's size), which fails the call."""
        conn, proc = self._conn, self._proc
        if conn is None or proc is None:
            raise StoreError("the audit writer process is not running")
        data = pickle.dumps(request, protocol=pickle.HIGHEST_PROTOCOL)
        if seconds is None:
            seconds = answer_within(self.store_timeout_s, len(data))
        # Killing the process ends a send or a receive blocked on it (EPIPE, end of file).
        lock, state = threading.Lock(), {"done": False, "cut": False}

        def cut() -> None:
            with lock:
                if not state["done"]:
                    state["cut"] = True
                    proc.kill()

        timer = threading.Timer(seconds, cut)
        timer.daemon = True
        timer.start()
        try:
            conn.send_bytes(data)
            reply: tuple[Any, ...] = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError) as exc:
            code = proc.poll()
            self.kill()
            if state["cut"]:
                raise StoreTimeout(
                    f"the audit writer process did not answer within {seconds:g} s (a store or "
                    "disk that stopped making progress); it was ended and is restarted for the "
                    "next try"
                ) from exc
            raise StoreError(
                f"the audit writer process ended (exit status {code}); it is restarted for the "
                f"next batch ({type(exc).__name__})"
            ) from exc
        finally:
            with lock:
                state["done"] = True
            timer.cancel()
        if state["cut"]:  # killed just as its answer came: start a new one next time
            self.kill()
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
