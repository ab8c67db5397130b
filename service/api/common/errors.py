"""The one place where errors become HTTP responses (DESIGN.md, "One contract for errors").

Every way in ends here: FastAPI's exception handlers (`install`), the front door's prediction
routes (`respond`), the body limit (`middleware.py`, 413) and the API-key guard (`auth.py`, 401
and 403). The route family (`family`) chooses the shape:

/v1: 422 bad request (413 too large), 404, 429 + Retry-After, 504; body {"error", "details"}.
/v2: the same codes but 400 for a bad request; body {"error"} (tritonclient reads it).
/cds-services: 400 bad request, 404, 412 needed data missing, a bare 401 (no body: nothing says
which check failed), 503 for overload and deadlines (and + Retry-After when replicas' shared
replay memory is unreachable); body a FHIR OperationOutcome.
Unexpected exceptions: 500 with a generic message and the request id, logged with the trace.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote, quote_from_bytes, unquote

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import Match

from service.api.common import html
from service.errors import McServeError, json_hint, shown_name

log = logging.getLogger("mcserve.errors")

STATUS = {
    "invalid_input": 422,
    "too_large": 413,
    "method_not_allowed": 405,
    "unsupported_media_type": 415,
    "not_found": 404,
    "forbidden": 403,
    "not_ready": 503,
    "overloaded": 429,
    "deadline": 504,
    "cancelled": 499,
    "shutting_down": 503,
    "compute_unavailable": 503,
    "audit_unavailable": 503,
    "replay_check_unavailable": 503,
    "model_error": 500,
    "bundle_error": 500,
    "internal": 500,
    "missing_data": 412,
    "unauthorized": 401,
}
CDS_STATUS = {422: 400, 429: 503, 504: 503}
CDS_ISSUE = {
    400: "invalid",
    404: "not-found",
    405: "not-supported",
    412: "required",
    413: "too-long",
    415: "not-supported",
}


def family(request: Request) -> str:
    path = request.url.path
    if path.startswith("/v2"):
        return "v2"
    if path.startswith("/cds-services"):
        return "cds"
    if path == "/models" or path.startswith("/models/"):
        return "pages"  # a person reading: an HTML page
    return "v1"


def request_id(request: Request) -> str:
    return str(getattr(request.state, "request_id", "") or request.headers.get("x-request-id", ""))


def error_response(
    request: Request,
    status: int,
    message: str,
    details: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
    reason: str | None = None,
) -> Response:
    # The access line's `error`: what kind of error, never the message, which may quote inputs.
    request.scope.setdefault("state", {})["error"] = reason or f"http_{status}"
    fam = family(request)
    if fam == "cds":
        return cds_response(request, status, message, details, headers)
    if fam == "pages":
        return html.error_page(status, message, request_id(request) or None, headers)
    if fam == "v2" and status == 422:
        status = 400
    body: dict[str, Any] = {"error": message}
    if fam == "v1" and details:
        body["details"] = details
    rid = request_id(request)
    if rid:
        body["request_id"] = rid
        # 500s are answered outside the request-id middleware: set the header here too.
        headers = {**(headers or {}), "x-request-id": rid}
    return Response(
        orjson.dumps(body), status_code=status, headers=headers, media_type="application/json"
    )


def cds_response(
    request: Request,
    status: int,
    message: str,
    details: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """CDS Hooks errors: a FHIR OperationOutcome, or a bare 401."""
    status = CDS_STATUS.get(status, status)
    rid = request_id(request)
    if rid:
        headers = {**(headers or {}), "x-request-id": rid}
    if status == 401:
        return Response(status_code=401, headers=headers)
    issues = [d for d in details or [] if "severity" in d and "code" in d]
    if not issues:
        code = CDS_ISSUE.get(status, "transient" if status == 503 else "exception")
        issues = [{"severity": "error", "code": code, "diagnostics": message}]
        said = [f"{d['field']}: {d['problem']}" for d in details or [] if "field" in d]
        # Each problem once: the message already names the first one.
        issues += [
            {"severity": "error", "code": code, "diagnostics": text}
            for text in dict.fromkeys(said)
            if text not in message
        ]
    body = {"resourceType": "OperationOutcome", "issue": issues}
    return Response(
        orjson.dumps(body), status_code=status, headers=headers, media_type="application/fhir+json"
    )


async def on_mcserve_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, McServeError)
    status = STATUS.get(exc.code, 500)
    headers = None
    if exc.retry_after_s is not None:  # overload, a compute restart, the shared replay memory
        headers = {"Retry-After": str(max(1, int(exc.retry_after_s)))}
    elif exc.code == "method_not_allowed":
        headers = {"Allow": "POST"}  # only the prediction routes raise it
    elif exc.code == "unauthorized" and family(request) != "cds":  # CDS: a bare 401
        headers = {"WWW-Authenticate": 'Bearer realm="mcserve"'}
    return error_response(request, status, exc.message, exc.details, headers, exc.code)


def _loc(loc: tuple[Any, ...]) -> str:
    parts = [shown_name(p) for p in loc if p != "body"]
    return ".".join(parts) or "body"


MAX_DETAILS = 20  # one per problem: 100,000 unknown keys made as many entries


async def on_validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    details = [
        {"field": _loc(tuple(e.get("loc", ()))), "problem": e.get("msg", ""), "type": e.get("type")}
        for e in errors[:MAX_DETAILS]
    ]
    if len(errors) > MAX_DETAILS:
        more = f"{len(errors) - MAX_DETAILS} more problems not listed"
        details.append({"field": "body", "problem": more, "type": "more"})
    first = details[0] if details else {"field": "body", "problem": "invalid request"}
    instance = _not_an_instance(errors)
    if instance is not None:  # instead of the union's "should be a valid array/object/string"
        first = {"field": "instances", "problem": instance}
    hint = ""
    if first.get("type") == "extra_forbidden":
        hint = " (unknown key: check its spelling against the API reference)"
    elif first.get("type") == "json_invalid":
        hint = json_hint(str(first["problem"]))
    message = f"invalid request: {first['field']}: {first['problem']}{hint}"
    fields = ", ".join(f"{d['field']} ({d.get('type')})" for d in details[:5])
    return error_response(request, 422, message, details, reason=f"invalid request: {fields}")


def _not_an_instance(errs: Sequence[Any]) -> str | None:
    """A /v1 instance of none of the three forms (a number, null, true), said in words. Read
    from the errors, not checked by a validator: one cost 19 % of parsing a large good body."""
    for e in errs:
        loc = tuple(p for p in e.get("loc", ()) if p != "body")
        if len(loc) >= 2 and loc[0] == "instances" and isinstance(loc[1], int):
            value = e.get("input")
            if not isinstance(value, list | dict | str):
                kind = "null" if value is None else type(value).__name__
                return (
                    f"instance {loc[1]} is {kind}: an instance is an array of the input shape, an "
                    'object keyed by feature name, or for a text model a string (or {"text": '
                    '"..."})'
                )
    return None


async def on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    message, status, headers = str(exc.detail), exc.status_code, dict(exc.headers or {})
    path, method = shown_name(request.url.path), request.method
    if status == 405 and method == "POST" and ":" in request.url.path.rsplit("/", 1)[-1]:
        # `/v1/models/m:PREDICT` matched the metadata route's {name}: the path is wrong, not the
        # method ("send GET" misled)
        status, headers = 404, {}
        message = (
            f"no route POST {path}; a prediction's path ends in ':predict' (lower case), see "
            "/docs for the API"
        )
    elif status == 404 and (bare := _without_slash(request)) is not None:
        # Starlette's own redirect named this server by the request's Host and scheme (behind
        # a TLS proxy: http://, a body re-sent in clear) and said nothing; a page's address is
        # moved with a relative Location, an API call told where it goes.
        shown = shown_name(bare)
        if method in ("GET", "HEAD"):
            status, headers = 307, {"Location": _location(request, bare)}
            message = f"{path} is at {shown} (no trailing slash)"
        else:
            message = f"no route {method} {path}; drop the trailing slash: {method} {shown}"
    elif status == 404:
        message = f"no route {method} {path}; see /docs for the API"
    elif status == 405:
        send = f"; send {headers['Allow']}" if headers.get("Allow") else ""
        message = f"method {method} is not allowed on {path}{send}"
    elif isinstance(exc.__cause__, McServeError):
        # FastAPI wraps whatever breaks while it reads a declared body into a 400: the body
        # limit's 413 (a chunked body has no Content-Length to check) is answered as itself.
        return await on_mcserve_error(request, exc.__cause__)
    return error_response(request, status, message, headers=headers)


def _location(request: Request, bare: str) -> str:
    """The request's own path and query, percent-encoded as sent, without the trailing slashes
    sent as / or %2F (the decoded path put a non-ASCII or CR LF character in the header: a 500,
    or no answer; /v1/models%2F pointed at itself). Where even that does not decode to `bare`,
    `bare` encoded."""
    raw = request.scope.get("raw_path") or request.scope["path"].encode()
    kept = re.sub(rb"(?:/|%2[fF])+\Z", b"", raw)
    if unquote(kept.decode("latin-1")) == bare:  # as uvicorn decodes it: UTF-8, replaced
        path = quote_from_bytes(kept, safe=_KEEP)
    else:  # no dot segments here: _without_slash leaves those a 404
        path = quote(bare, safe=_KEEP.replace("%", ""))
    query = request.scope.get("query_string") or b""
    return path + (f"?{quote_from_bytes(query, safe=_KEEP + '?')}" if query else "")


_KEEP = "/%:@!$&'()*+,;=-._~"  # kept as sent: reserved characters and escapes already made


def _without_slash(request: Request) -> str | None:
    """The path without its trailing slashes, if a route takes it (None: none, or no slash)."""
    path = request.scope["path"]
    bare = path.rstrip("/")
    if bare == path or not bare or bare.startswith("//"):  # "//host" would leave this server
        return None
    if any(seg in (".", "..") for seg in bare.split("/")):  # a client resolves them, to
        return None  # another route (..%2F cut to ..: review R12); a plain 404
    scope = {**request.scope, "path": bare}
    router = request.app.router
    return bare if any(r.matches(scope)[0] != Match.NONE for r in router.routes) else None


async def on_unexpected(request: Request, exc: Exception) -> Response:
    rid = request_id(request)
    log.error("unexpected error", exc_info=exc, extra={"request_id": rid, "path": request.url.path})
    return error_response(
        request, 500, f"internal error; quote request id {rid or '-'} when reporting it"
    )


async def respond(request: Request, exc: Exception) -> Response:
    """The answer to any exception, as FastAPI's handlers below give it (for the front door)."""
    if isinstance(exc, McServeError):
        return await on_mcserve_error(request, exc)
    if isinstance(exc, RequestValidationError):
        return await on_validation_error(request, exc)
    if isinstance(exc, StarletteHTTPException):
        return await on_http_error(request, exc)
    return await on_unexpected(request, exc)


def install(app: FastAPI) -> None:
    app.add_exception_handler(McServeError, on_mcserve_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
