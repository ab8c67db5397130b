"""Request bodies sent compressed: `Content-Encoding: gzip` or `deflate` (what tritonclient's
`request_compression_algorithm` sends, as Triton accepts), decompressed before any route reads
them; any other coding is a 415. Without this a gzip body was a 422 "cannot be parsed", and a
body declared compressed but sent plain was silently read as plain.

The compressed body is limited by `RequestContext` (outside this layer); what it decompresses to
is limited here, by the same `max_body_bytes`, as it is inflated: a small "zip bomb" never gets
past the limit in memory. Inside the API-key guard, so an unauthenticated client cannot make the
server inflate anything.
"""

from __future__ import annotations

import zlib

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.common import errors
from service.errors import InvalidInputError, PayloadTooLargeError, UnsupportedMediaTypeError

CODINGS = ("gzip", "x-gzip", "deflate")


class ContentEncoding:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope.get("headers") or []
        coding = b",".join(v for k, v in headers if k.lower() == b"content-encoding")
        name = coding.decode("latin-1").strip().lower()
        if name in ("", "identity"):
            await self.app(scope, receive, send)
            return
        try:
            if name not in CODINGS:
                raise UnsupportedMediaTypeError(
                    f"Content-Encoding {name!r} is not read here; send the body uncompressed, "
                    "or compressed with gzip or deflate"
                )
            body = self._inflate(await _body(receive), name)
        except (UnsupportedMediaTypeError, InvalidInputError, PayloadTooLargeError) as exc:
            response = await errors.respond(Request(scope), exc)
            await response(scope, receive, send)
            return
        kept = [
            (k, v) for k, v in headers if k.lower() not in (b"content-encoding", b"content-length")
        ]
        scope = {**scope, "headers": [*kept, (b"content-length", str(len(body)).encode())]}
        given = False

        async def replay() -> Message:
            nonlocal given
            if not given:
                given = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # a disconnect, afterwards

        await self.app(scope, replay, send)

    def _inflate(self, data: bytes, name: str) -> bytes:
        # 32 + 15: a gzip or zlib header, detected; HTTP's "deflate" is zlib, some clients send
        # it raw (-15).
        for wbits in (47, -15) if name == "deflate" else (31,):
            d = zlib.decompressobj(wbits)
            try:
                out = d.decompress(data, self.max_body_bytes + 1)
            except zlib.error:
                continue
            if len(out) > self.max_body_bytes:
                raise PayloadTooLargeError(
                    f"the body decompresses to over {self.max_body_bytes} bytes (setting "
                    "max_body_bytes); split the request"
                )
            if d.eof and not d.unused_data:
                return out
        raise InvalidInputError(
            f"the body is not complete {name} data (Content-Encoding: {name}); compress the "
            "whole body with it, or send it uncompressed without the header"
        )


async def _body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)
