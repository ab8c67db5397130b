"""Hold connections to what the server's file descriptors allow (uvicorn's httptools protocol).

uvicorn (0.55) closes an idle keep-alive connection after `timeout_keep_alive`, but holds a
connection that sends nothing, part of a request head, or its body slowly, for as long as the
client likes: with 1,024 file descriptors, 1,100 such connections made every request fail
(accept() fails with EMFILE), before any authentication could run. This protocol adds:

- a deadline for each request head, `header_timeout_s` from the connection (first request) or
  from the request's first byte (later ones): then 408 and the connection is closed;
- a deadline for the body, `body_timeout_s` from the end of the head: 408 if no answer has
  started, and closed (the app sees a disconnect);
- a cap on connections waiting for a request head (idle keep-alive ones included),
  `max_pending_connections`, and one on all connections, `max_connections`: a new connection
  over either closes the one that has waited longest for its head (an honest client sends its
  head in one packet, so the oldest waiting is the likeliest to be hostile); with none waiting,
  the new connection is answered 503 and closed.

uvicorn's `limit_concurrency` test (over `max_concurrency` connections or requests) is kept, with
a JSON 503 (`busy`), but not for the probes (PROBES): under a burst at the cap, the kubelet's
liveness probe got 503s and restarted a pod that was only busy, dropping its queue onto the other
replicas. Idle keep-alive connections count, so `max_pending_connections` (which bounds them)
must stay below `max_concurrency` (settings_check.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("mcserve.connections")
# Files, sockets and pipes the server itself needs besides client connections (models, the
# audit store, the compute process's socket, the event loop's own): an idle server with the
# bundled models holds about 40.
RESERVED_FDS = 128
# Health probes and the metrics scrape: cheap, and wanted most when the server is at its cap.
PROBES = frozenset({b"/healthz", b"/readyz", b"/v2/health/live", b"/v2/health/ready", b"/metrics"})


@dataclass(frozen=True)
class Limits:
    header_timeout_s: float
    body_timeout_s: float
    max_pending: int
    max_connections: int


def default_max_connections() -> int:
    """The process's open-file limit less what the server needs for itself."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft > 1 << 20:
        soft = 1 << 20
    return max(16, soft - RESERVED_FDS)


@dataclass
class Guard:
    """One server's connections waiting for a request head, oldest first, and what was closed."""

    limits: Limits
    waiting: dict[GuardedProtocol, None] = field(default_factory=dict)
    closed: Counter[str] = field(default_factory=Counter)

    def evict_oldest(self, reason: str) -> bool:
        if not self.waiting:
            return False
        victim = next(iter(self.waiting))
        del self.waiting[victim]
        victim.close(reason)
        return True


BUSY = (
    b'{"error": "the server has as many requests in flight as MCSERVE_MAX_CONCURRENCY allows; '
    b'retry shortly, or on another replica"}'
)


async def busy(scope: Any, receive: Any, send: Any) -> None:
    """The 503 over `max_concurrency`, answered below the app: JSON with Retry-After and a
    request id like every other error (uvicorn's own was text/plain without either)."""
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", b"%d" % len(BUSY)),
        (b"retry-after", b"1"),
        (b"x-request-id", os.urandom(12).hex().encode()),
    ]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": BUSY})


def uvicorn_limit(max_concurrency: int | None) -> int | None:
    """uvicorn's `limit_concurrency` for at most `max_concurrency` connections or requests:
    uvicorn counts the asking request's own connection (503 once `limit` are open, itself
    among them), so 1 refused every request while /readyz, exempt, said ready."""
    return None if max_concurrency is None else max_concurrency + 1


def protocol(guard: Guard) -> type[GuardedProtocol]:
    """A protocol class for uvicorn.Config(http=...) sharing `guard` among its connections."""
    return type("GuardedProtocol", (GuardedProtocol,), {"guard": guard})


class GuardedProtocol(HttpToolsProtocol):
    guard: ClassVar[Guard]
    _timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        g = self.guard
        if len(self.connections) > g.limits.max_connections and not g.evict_oldest("evicted"):
            self.close(
                "refused",
                b"503 Service Unavailable",
                "too many connections, every one busy (setting max_connections): retry shortly",
            )
            return
        g.waiting[self] = None
        if len(g.waiting) > g.limits.max_pending:
            g.evict_oldest("evicted")
        self._arm(g.limits.header_timeout_s, self._head_late)

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.waiting.pop(self, None)
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._timer is None:  # a later request on a kept-alive connection
            self.guard.waiting[self] = None
            self._arm(self.guard.limits.header_timeout_s, self._head_late)

    def on_headers_complete(self) -> None:
        self.guard.waiting.pop(self, None)
        self._arm(self.guard.limits.body_timeout_s, self._body_late)
        cap, app = self.limit_concurrency, self.app
        self.limit_concurrency = None  # read by uvicorn's on_headers_complete alone
        if self.url.split(b"?", 1)[0] in PROBES:
            pass
        elif cap is not None and (len(self.connections) >= cap or len(self.tasks) >= cap):
            # uvicorn's test, our answer (`busy`): counted here, since the app never sees it
            self.guard.closed["concurrency"] += 1
            self.app = busy
        try:
            super().on_headers_complete()
        finally:
            self.limit_concurrency, self.app = cap, app

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        idle = not self.pipeline  # else the next request's head is already in
        super().on_response_complete()
        if idle and not self.transport.is_closing():
            self.guard.waiting[self] = None  # waits for its next head: may be evicted

    def _arm(self, seconds: float, callback: Any) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, callback)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _head_late(self) -> None:
        self._timer = None
        self.guard.waiting.pop(self, None)
        if self.cycle is not None and not self.cycle.response_complete:
            self.close("header_timeout")  # an answer to the previous request is under way
            return
        s = self.guard.limits.header_timeout_s
        self.close(
            "header_timeout",
            b"408 Request Timeout",
            f"no request head within {s:g} s (setting header_timeout_s): send the request at once",
        )

    def _body_late(self) -> None:
        self._timer = None
        cycle = self.cycle
        if cycle is None or cycle.response_started:
            self.close("body_timeout")
            return
        # As connection_lost would: the app's receive() answers a disconnect, its send() nothing.
        # Marked, so the app's access line says the 408 the client got, not a 499 (review SRE).
        cycle.scope.setdefault("state", {})["closed_by"] = "body_timeout"
        cycle.disconnected = True
        cycle.message_event.set()
        s = self.guard.limits.body_timeout_s
        self.close(
            "body_timeout",
            b"408 Request Timeout",
            f"request body not received in {s:g} s (setting body_timeout_s): send it faster, or "
            "in smaller requests",
        )

    def close(self, reason: str, status: bytes = b"", message: str = "") -> None:
        """Close the connection, first answering `status` when no answer is under way."""
        self._disarm()
        self.guard.closed[reason] += 1
        if self.transport.is_closing():
            return
        if status:  # JSON, as every other error is (it was plain text: review G)
            body = orjson.dumps({"error": message}) + b"\n"
            head = b"HTTP/1.1 %s\r\ncontent-type: application/json\r\n" % status
            head += b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body)
            self.transport.write(head + body)
        self.transport.close()
        log.debug("connection closed", extra={"reason": reason})
