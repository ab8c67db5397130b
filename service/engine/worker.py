"""The compute process: one per server (so per device): compute and HTTP in two interpreters.

On the compute thread, the Monte Carlo work needs the GIL for its Python between numpy and torch
calls, about fifty times a batch; while the event loop is busy each of those waits for the
interpreter's switch interval (5 ms). Measured on 2 cores: a 64-request batch that takes 2.5 ms
alone took 234 ms beside a busy loop, so under load compute ran only while the loop sat idle and
the two alternated on one core (process CPU 1.0 core, the second core idle). Here the work runs
in a child process, the way Triton's Python backend runs a model in a stub process: the event
loop writes each batch to a Unix socket and reads the answers back without a thread of its own,
so nothing in the server waits for the GIL.

The child (`compute_child.py`) builds its own copy of each model from the same bundle and
settings (`ModelFactory`), checks that its digest is the one the server loaded, and runs
`compute.run`, the function the compute thread runs: the numbers are the same (tested). This is
the server's side: it starts the child, feeds and reads it, watches its heartbeat and progress,
and if it dies (or is killed as hung) fails the batches it held with 503 and starts a new one
(at once, or after a pause when the last one died young), which loads the served models before
the replica is ready again (`_recover`); requests meanwhile get 503 at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import pickle
import subprocess
import time
from collections.abc import Awaitable, Callable
from typing import Any

from service.child import spawn
from service.engine import cancels
from service.engine.compute import Outcome, Work
from service.engine.compute_child import HEADER, HEARTBEAT, HEARTBEAT_S, WorkerSpec, frame, key_of
from service.engine.model import ServedModel
from service.errors import ComputeRestartingError, ComputeUnavailableError, McServeError

log = logging.getLogger("mcserve.worker")
RESTART_PAUSE_S = 1.0  # after a failed start, calls fail at once for this long
RECOVER_MAX_S = 30.0  # a child that dies again and again: restarts at most this far apart
STABLE_S = 60.0  # a child that lived this long resets that pause; one that died sooner doubles it
CLOSE_S = 2.0  # at shutdown, the child's time to exit before it is killed (deploy's grace)


class ComputeProcess:
    """The server's side: started lazily, fed and read by the event loop, restarted on death."""

    def __init__(
        self,
        spec: WorkerSpec,
        start_timeout_s: float = 300.0,
        stall_s: float = 0.0,
        stuck_s: float = 0.0,
    ) -> None:
        self.spec = spec
        self.start_timeout_s = start_timeout_s
        # A child silent for `stall_s` while it holds calls is hung (stopped, or holding the
        # GIL) and is killed. Silence, not each call's age: a call may wait behind others in
        # the child (model loads, pipelined batches) longer than any fixed limit (review R7).
        self.stall_s = stall_s  # 0: never judged hung
        # A batch whose forward count has not moved this long is stuck (progress.py); longer
        # than stall_s: one forward, ONNX run or summary may take a while (review R20).
        self.stuck_s = stuck_s  # 0: never judged stuck
        self._heard = time.monotonic()  # the child's last frame (answer or heartbeat)
        # From its heartbeats (progress.py): whether it computes a batch, its forward count,
        # and when that count last moved (or it was idle): a stuck main thread beats on.
        self._computing = False
        self._forwards = 0
        self._moved = time.monotonic()
        self._watchdog: asyncio.Task[None] | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count()
        self._starting: asyncio.Lock | None = None
        self._ready = False  # greeted; calls may go
        self._closing = False
        self._failed_at = -math.inf  # when a start last failed, and why
        self._failure = ""
        # A child that died is restarted at once, in the background, and `on_restart` loads
        # the served models into it; until both are done the replica is not ready (a crash
        # left /readyz 200 and charged the restart, seconds, to the next request: review SRE).
        self.on_restart: Callable[[], Awaitable[None]] | None = None
        self._recovery: asyncio.Task[None] | None = None
        self._started_at = -math.inf  # when the child in use was greeted
        self._backoff = RESTART_PAUSE_S

    @property
    def alive(self) -> bool:
        """Started and greeted: calls may go."""
        return self._ready

    def not_ready_reason(self) -> str | None:
        """For /readyz: why this replica cannot compute now (its child is being restarted)."""
        if self._recovery is not None and not self._recovery.done():
            return "compute process restarting (it stopped; its models are loading again)"
        return None

    @property
    def in_flight(self) -> int:
        """Calls sent and not yet answered."""
        return len(self._pending)

    async def start(self) -> None:
        """Start the child if it is not running (at start-up, and after it died)."""
        self._starting = self._starting or asyncio.Lock()
        async with self._starting:
            if self._ready:
                return
            if self._closing:
                raise ComputeUnavailableError("the server is shutting down; retry elsewhere")
            now = time.monotonic()
            if now - self._failed_at < RESTART_PAUSE_S:  # no spawn storm from a broken start
                raise ComputeUnavailableError(
                    f"the compute process failed to start ({self._failure}); retry shortly"
                )
            flags = cancels.shared()  # the child inherits their descriptor (cancels.py)
            fds = [flags.fd] if flags is not None else []
            self.proc, ours = spawn("service.engine.compute_child", pass_fds=fds)
            self.starts += 1
            reader, self._writer = await asyncio.open_unix_connection(sock=ours)
            reading = self._read(reader, self.starts)
            self._reader_task = asyncio.get_running_loop().create_task(reading)
            try:  # the greeting goes first: no other call is written before it
                shared = (flags.key, flags.fd) if flags is not None else None
                hello = self._send("hello", self.spec, shared)
                pid = await asyncio.wait_for(hello, self.start_timeout_s)
            except BaseException as exc:
                self._failed_at, self._failure = time.monotonic(), f"{type(exc).__name__}: {exc}"
                self._lost()  # kills it if it hangs, fails anything it held
                raise ComputeUnavailableError(
                    f"the compute process failed to start ({self._failure}); retry shortly"
                ) from exc
            self._ready = True
            self._heard = self._moved = self._started_at = time.monotonic()
            self._computing, self._forwards = False, 0  # a new child counts from 0
            if (self.stall_s > 0 or self.stuck_s > 0) and self._watchdog is None:
                self._watchdog = asyncio.get_running_loop().create_task(self._watch())
            log.info("compute process started", extra={"pid": pid, "starts": self.starts})

    async def _watch(self) -> None:
        """Kill a child that holds calls and has said nothing for `stall_s`, or whose batch has
        run no forward for `stuck_s` (progress.py): what it held answers 503 and a new one is
        started (a stopped child held requests without a deadline for ever, readiness stayed
        200, and the queue filled to 429s). Its heartbeat comes from a thread of its own: the
        silence catches a child stopped or holding the GIL, the forward count one whose main
        thread waits for ever with the GIL released."""
        interval = min(HEARTBEAT_S, *(t / 4 for t in (self.stall_s, self.stuck_s) if t > 0))
        tick = time.monotonic()
        while not self._closing:
            await asyncio.sleep(interval)
            now, late = time.monotonic(), time.monotonic() - tick > 2 * interval
            tick = now
            if late:  # this loop itself was held: the child's frames may be unread yet
                continue
            try:
                silent = now - self._heard
                stuck = now - self._moved if self._computing else 0.0
                over_silent = 0 < self.stall_s < silent
                if self._ready and self._pending and (over_silent or 0 < self.stuck_s < stuck):
                    log.error(
                        "compute process silent: killed"
                        if over_silent
                        else "compute process stuck (no forward): killed",
                        extra={
                            "seconds": round(silent if over_silent else stuck, 1),
                            "in_flight": len(self._pending),
                        },
                    )
                    self._lost()
            except Exception:  # the watch goes on whatever one check hit
                log.exception("compute process watch failed")

    async def prepare(self, model: ServedModel) -> None:
        """Load and warm the child's copy of `model` (raises if it cannot: the model is not
        ready then)."""
        await self._call("prepare", key_of(model), model.bundle.path)

    async def release(self, model: ServedModel) -> None:
        """Drop the child's copy (nothing to do if it is gone: a new one loads what it needs)."""
        if self._ready:
            with contextlib.suppress(McServeError):
                await self._call("release", key_of(model))

    async def compute(self, model: ServedModel, works: list[Work]) -> list[Outcome]:
        """`compute.run(model, works)` in the child; its engine counters are added to
        `model.sampler.stats` here, so the server's counters count the child's work."""
        results, counts = await self._call("compute", key_of(model), model.bundle.path, works)
        if counts:
            model.sampler.stats.add(**counts)
        return list(results)

    async def _call(self, op: str, *args: object) -> Any:
        if self._closing:
            raise ComputeUnavailableError("the server is shutting down; retry on another replica")
        if not self._ready:
            if self._recovery is not None and not self._recovery.done():
                # The recovery starts the child, after its pause: a request starting one here
                # bypassed the pause of a crash loop and reloaded every model (review R20).
                raise ComputeRestartingError(
                    "the compute process is restarting (its models are loading); retry shortly, "
                    "or on another replica"
                )
            await self.start()
        return await self._send(op, *args)

    async def _send(self, op: str, *args: object) -> Any:
        if self._writer is None:
            raise ComputeUnavailableError("the compute process stopped; retry")
        ident = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[ident] = fut
        self._writer.write(frame((ident, op, args)))
        return await fut

    async def _read(self, reader: asyncio.StreamReader, generation: int) -> None:
        try:
            while True:
                n = int.from_bytes(await reader.readexactly(HEADER), "big")
                ident, ok, value = pickle.loads(await reader.readexactly(n))
                if generation == self.starts:
                    self._heard = time.monotonic()
                if ident == HEARTBEAT:
                    if generation == self.starts and value is not None:
                        self._beat(*value)
                    continue
                fut = self._pending.pop(ident, None)
                if fut is not None and not fut.done():
                    fut.set_result(value) if ok else fut.set_exception(value)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the child exited or the socket closed
        finally:
            if generation == self.starts:  # not a process already replaced
                self._lost()

    async def _recover(self) -> None:
        """Start a new child and load the served models into it (`on_restart`), until one child
        holds them all: a child that dies on the way (or a start that fails) is tried again,
        after a pause when it died soon after starting, doubled each time up to RECOVER_MAX_S
        and reset by a child that lived STABLE_S (a crash loop reloaded every model back to
        back, and a second death mid-load ended ready with models missing: review R19)."""
        failed = False
        while not self._closing:
            if failed or time.monotonic() - self._started_at < STABLE_S:
                await asyncio.sleep(self._backoff)
                self._backoff = min(2 * self._backoff, RECOVER_MAX_S)
            else:
                self._backoff = RESTART_PAUSE_S
            try:
                await self.start()
                child = self.starts
                if self.on_restart is not None:
                    await self.on_restart()
                if self._ready and self.starts == child:  # one child took every model
                    log.info("compute process restarted", extra={"starts": self.starts})
                    return
                failed = True
            except Exception as exc:  # its start, or a model's load: tried again after a pause
                reason = exc.message if isinstance(exc, McServeError) else repr(exc)
                log.warning("compute process restart failed", extra={"reason": reason})
                failed = True

    def _beat(self, computing: bool, forwards: int) -> None:
        now = time.monotonic()
        if not computing or forwards != self._forwards:
            self._moved = now
        self._computing, self._forwards = computing, forwards

    def _lost(self) -> None:
        """Fail what the child held; a child that was serving is restarted in the background."""
        was_ready, self._ready = self._ready, False
        if self._writer is not None:
            self._writer.close()
        self._writer = None
        code = None
        if self.proc is not None:
            code = self.proc.poll()
            if code is None and not self._closing:  # exiting, or hung without its socket
                self.proc.kill()
                dead = self.proc
                asyncio.get_running_loop().run_in_executor(None, dead.wait)  # reap, off the loop
        pending, self._pending = self._pending, {}
        if (pending or was_ready) and not self._closing:  # idle too: it went unreported
            log.error("compute process stopped", extra={"code": code, "in_flight": len(pending)})
        exit_code = f" (exit code {code})" if code is not None else ""
        recovering = self._recovery is not None and not self._recovery.done()
        if was_ready and not self._closing and not recovering:
            self._recovery = asyncio.get_running_loop().create_task(self._recover())
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(
                    ComputeUnavailableError(
                        f"the compute process stopped{exit_code} while it held this request; "
                        "it is being restarted: retry shortly"
                    )
                )

    async def close(self, timeout_s: float = CLOSE_S) -> None:
        """End the child: it exits at end of input, after the batch it holds; past `timeout_s`
        it is killed. By now every request it could answer has been answered or failed (the
        drain is over), so nothing waits for that batch; waiting for it (the reader first, with
        no limit, then 10 s) kept a pod past its grace period."""
        self._closing = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._recovery is not None:
            self._recovery.cancel()
        if self._writer is not None:
            self._writer.close()
        if self.proc is not None:
            try:
                await asyncio.to_thread(self.proc.wait, timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                await asyncio.to_thread(self.proc.wait)
        if self._reader_task is not None:  # the child's end is closed: it reads to the end
            await asyncio.gather(self._reader_task, return_exceptions=True)
