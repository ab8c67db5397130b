"""Request bodies sent compressed: `Content-Encoding: gzip` or `deflate` (what tritonclient's
`request_compression_algorithm` sends, as Triton accepts), decompressed as a route reads them
(after its own checks: a body no route reads is never inflated); any other coding is a 415.
Without this a gzip body was a 422 "cannot be parsed", and a body declared compressed but sent
plain was silently read as plain.

The compressed body is limited by `RequestContext` (outside this layer); what it decompresses to
is limited here, by the same `max_body_bytes`, as it is inflated: a small "zip bomb" never gets
past the limit in memory. Inside the API-key guard, so an unauthenticated client cannot make the
server inflate anything; the inflated copy counts against the server's budget of body bytes in
flight (inflight.py) until the request ends.
"""

from __future__ import annotations

import zlib

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.common.inflight import BodyBudget
from service.api.common.middleware import smaller
from service.errors import InvalidInputError, PayloadTooLargeError, UnsupportedMediaTypeError

CODINGS = ("gzip", "x-gzip", "deflate")
# gzip members one body may hold. Each member's end copies the rest of the body (zlib's
# unused_data), so 400,000 empty members in 8 MB took 30 s on the event loop, every other client
# waiting (the liveness probe too); at 16 the copies stay under 16 bodies' worth.
MAX_MEMBERS = 16


class ContentEncoding:
    def __init__(self, app: ASGIApp, max_body_bytes: int, budget: BodyBudget | None = None) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.budget = budget

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)  # no body to read
            return
        headers = scope.get("headers") or []
        coding = b",".join(v for k, v in headers if k.lower() == b"content-encoding")
        name = coding.decode("latin-1").strip().lower()
        if name in ("", "identity"):
            await self.app(scope, receive, send)
            return
        # In place, not a copy: the routes write `route` and `path_params` into this scope, and
        # RequestContext reads them from it for the access log and metrics. The inflated
        # length is not known before the route reads the body.
        dropped = (b"content-encoding", b"content-length")
        scope["headers"] = [(k, v) for k, v in headers if k.lower() not in dropped]
        taken = 0  # inflated bytes held against the budget
        read = False

        async def inflated() -> Message:
            # Read and inflated when the route reads its body, after its own checks (a CDS
            # call's token, the model's name): a body no route reads is never inflated, and an
            # unauthenticated client holds nothing against the budget (review K, D1). What
            # goes wrong is raised to the route, which answers it in its family's shape.
            nonlocal taken, read
            if read:
                return await receive()  # a disconnect, afterwards
            read = True
            if name not in CODINGS:  # said when the body is read, as any error of it (a CDS
                # call without a token learnt of its coding before being told 401)
                raise UnsupportedMediaTypeError(
                    f"Content-Encoding {name!r} is not read here; send the body uncompressed, "
                    "or compressed with gzip or deflate"
                )
            data = await _body(receive)
            if data is None:  # the client went away mid-body
                return {"type": "http.disconnect"}
            body = self._inflate(data, name, scope) if data else data
            if self.budget is not None:  # the inflated copy is held too, beside the wire bytes
                self.budget.take(len(body))
                taken = len(body)
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            await self.app(scope, inflated, send)
        finally:
            if taken:
                self.budget.give(taken)  # type: ignore[union-attr]  # taken only with a budget

    def _inflate(self, data: bytes, name: str, scope: Scope) -> bytes:
        # 32 + 15: a gzip or zlib header, detected; HTTP's "deflate" is zlib, some clients send
        # it raw (-15). A gzip body may hold several members, one after the other (RFC 1952).
        for wbits in (47, -15) if name == "deflate" else (31,):
            parts: list[bytes] = []
            size, rest = 0, data
            try:
                while rest:
                    if len(parts) == MAX_MEMBERS:
                        raise InvalidInputError(
                            f"the body holds more than {MAX_MEMBERS} gzip members; compress it "
                            "as one (or a few), or send it uncompressed"
                        )
                    d = zlib.decompressobj(wbits)
                    parts.append(d.decompress(rest, self.max_body_bytes + 1 - size))
                    size += len(parts[-1])
                    if size > self.max_body_bytes or d.unconsumed_tail:
                        raise PayloadTooLargeError(
                            f"the body decompresses to over {self.max_body_bytes} bytes "
                            f"(setting max_body_bytes); {smaller(scope)}"
                        )
                    if not d.eof:
                        raise zlib.error("truncated")
                    rest = d.unused_data if wbits == 31 else b""
                    if wbits != 31 and d.unused_data:
                        raise zlib.error("data after the end")
                return b"".join(parts)
            except zlib.error:
                continue
        raise InvalidInputError(
            f"the body is not complete {name} data (Content-Encoding: {name}); compress the "
            "whole body with it, or send it uncompressed without the header"
        )


async def _body(receive: Receive) -> bytes | None:
    """The whole body, or None when the client disconnects before its end."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)
