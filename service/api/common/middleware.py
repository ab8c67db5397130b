"""Pure ASGI middleware (cheaper than BaseHTTPMiddleware): request ids and the body size limit."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import time
from collections.abc import Callable
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.common import errors
from service.api.common.inflight import BodiesOverBudget, BodyBudget
from service.errors import DRAIN_OUT, McServeError, PayloadTooLargeError, ShuttingDownError
from service.metrics import Metrics

access_log = logging.getLogger("mcserve.access")

_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# A random per-process prefix and a counter: unique across replicas, and ~50x cheaper than
# uuid4, whose getrandom() call showed as 6 % of the server's CPU under load.
_PREFIX = os.urandom(8).hex()
_COUNTER = itertools.count(1)


def new_request_id() -> str:
    return f"{_PREFIX}{next(_COUNTER):016x}"


def smaller(scope: Scope) -> str:
    """How a client gets under the body limit: a CDS Hooks call cannot be split."""
    path = str(scope.get("path", ""))
    if path.startswith("/cds-services") and path.endswith("/feedback"):
        return "send fewer feedback entries per call"
    if path.startswith("/cds-services"):
        return (
            "a hook call cannot be split: send less prefetch (fewer or more recent results) "
            "or ask the operator to raise MCSERVE_MAX_BODY_BYTES"
        )
    return "send fewer instances per request, or ask the operator to raise MCSERVE_MAX_BODY_BYTES"


class BodyTooLarge(PayloadTooLargeError):
    """Raised by `receive` past the limit: a handler that reads the body answers it as any
    error (`errors.py`, shaped by route family); one that lets it escape, RequestContext."""


class RequestContext:
    """Sets scope['state']['request_id'] (X-Request-ID honoured if sane, else generated), echoes
    it in the response, refuses bodies over `max_body_bytes` with 413 before parsing them, counts
    their bytes against the server's `budget` until the request ends (inflight.py), and writes
    one access log line and the request metrics per request. A request that uvicorn
    cancels because the drain time ran out (`draining()` true) answers 503 and says so."""

    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int,
        metrics: Metrics | None = None,
        draining: Callable[[], bool] = lambda: False,
        budget: BodyBudget | None = None,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.budget = budget
        self.metrics = metrics
        self.draining = draining

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = given if _SAFE_ID.match(given) else new_request_id()
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        state["arrived"] = time.monotonic()  # a deadline counts from here (call.run)
        status = 500  # what the client gets if the app raises (ServerErrorMiddleware answers)
        raw_len = headers.get(b"content-length")
        held = 0  # bytes of this body taken from the budget
        try:
            if raw_len is not None and raw_len.isdigit() and int(raw_len) > self.max_body_bytes:
                status = 413
                await self._refuse(self._too_large(scope), scope, receive, send)
                return
            seen = 0
            started = gone = False

            async def limited_receive() -> Message:
                nonlocal seen, held, gone
                if self.budget is not None and seen == 0 and raw_len is not None:
                    # A declared body that cannot fit now is refused before a byte of it is
                    # read (a client that sent Expect: 100-continue never sends it); nothing
                    # is taken for a declaration (inflight.py), its bytes count as they come.
                    self.budget.check(int(raw_len) if raw_len.isdigit() else 0)
                message = await receive()
                gone = gone or message["type"] == "http.disconnect"
                if message["type"] == "http.request":
                    size = len(message.get("body", b""))
                    seen += size
                    if seen > self.max_body_bytes:
                        raise self._too_large(scope)
                    if self.budget is not None and size:
                        self.budget.take(size)
                        held += size
                return message

            async def send_with_id(message: Message) -> None:
                nonlocal started, status
                if message["type"] == "http.response.start":
                    started = True
                    status = message["status"]
                    out = list(message.get("headers", []))
                    if not any(k.lower() == b"x-request-id" for k, _ in out):
                        out.append((b"x-request-id", rid.encode()))
                    message["headers"] = out
                await send(message)

            try:
                await self.app(scope, limited_receive, send_with_id)
            except (BodyTooLarge, BodiesOverBudget) as exc:
                if not started:
                    status = await self._refuse(exc, scope, receive, send)
            except ClientDisconnect:
                if not gone:
                    raise
            except asyncio.CancelledError:
                # uvicorn cancels what still runs when the drain time is out: its answer was a
                # 500 and a traceback in the log. The batchers' requests got this 503 just
                # before (server.py); the rest (a body still arriving, a CDS call's FHIR
                # fetch) get it here.
                if started or not self.draining():
                    raise
                status = 503
                await self._refuse(ShuttingDownError(DRAIN_OUT), scope, receive, send)
            if gone and not started:
                status = 499  # gone before its answer (e.g. while sending its body): not a 500
                if state.get("closed_by") == "body_timeout":  # answered below: connections.py
                    status = 408
        finally:
            if held:
                self.budget.give(held)  # type: ignore[union-attr]  # held only with a budget
            self._record(scope, status, time.perf_counter() - start)

    def _record(self, scope: Scope, status: int, seconds: float) -> None:
        """The access line and request metrics: ids, model, status, timings; never inputs,
        keys or tokens (no body, no headers, no query string)."""
        state = scope.get("state", {})
        route = scope.get("route")
        template = getattr(route, "path", None) or "(unmatched)"
        model = (scope.get("path_params") or {}).get("name")
        # What the connection layer answered is counted there (connections_closed_total) only.
        if self.metrics is not None and "closed_by" not in state:
            self.metrics.observe_request(model, template, status, seconds)
        if not access_log.isEnabledFor(logging.INFO):
            return  # the line would be dropped: do not build it (this runs for every request)
        extra: dict[str, Any] = {
            "request_id": state.get("request_id"),
            "method": scope.get("method"),
            "route": template,
            "status": status,
            "duration_ms": round(seconds * 1000, 3),
        }
        for key in (
            "model",
            "version",
            "caller",
            "featurise_ms",
            "batch_rows",
            "queue_ms",
            "compute_ms",
            "error",
        ):
            if state.get(key) is not None:
                extra[key] = state[key]
        if "model" not in extra and model is not None:
            extra["model"] = model
        access_log.info("request", extra=extra)

    def _too_large(self, scope: Scope) -> BodyTooLarge:
        return BodyTooLarge(
            f"request body is over {self.max_body_bytes} bytes (setting max_body_bytes); "
            + smaller(scope)
        )

    async def _refuse(self, exc: McServeError, scope: Scope, receive: Receive, send: Send) -> int:
        response = await errors.respond(Request(scope), exc)
        await response(scope, receive, send)
        return response.status_code
