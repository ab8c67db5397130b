"""The prediction routes without FastAPI's per-request machinery (same contract).

Measured with py-spy at concurrency 64: the event loop, not the engine, limits requests/s, and
much of its time went to layers a prediction does not need: FastAPI's exception, exit-stack and
body-limit wrappers around every send and receive, matching the path against every route, and
dependency solving. This ASGI app is the innermost layer of the front door (`app.McServeApp`:
our request id, body limit, metrics, CORS and API keys apply, Starlette's own layers do not) and
answers the two prediction routes itself:
`POST /v1/models/{name}[/versions/{v}]:predict` (the same request model, `PredictRequest`, parsed
by pydantic from JSON, and the same handler, `native.predict_with`) and the Open Inference
Protocol's `POST /v2/models/{name}[/versions/{v}]/infer` (the same handler, `v2.infer_with`,
which reads the body itself), with the same error mapping (`errors.py`): another method is
405 with `Allow: POST`, a native body of another content type than JSON 415. Anything else
(`route_of` is None) goes to FastAPI, which also keeps the routes in the OpenAPI document.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.common import errors
from service.api.common.call import off_loop, state
from service.api.common.middleware import BodyTooLarge
from service.api.native.predict import predict_with
from service.api.native.routes import SUBJECT_PATTERN
from service.api.native.routes import router as native_router
from service.api.native.schemas import PredictRequest
from service.api.oip.binary import HEADER
from service.api.oip.routes import infer_with
from service.api.oip.routes import router as v2_router
from service.engine.inputs import check_size
from service.errors import (
    InvalidInputError,
    McServeError,
    MethodNotAllowedError,
    UnsupportedMediaTypeError,
)

_NATIVE = ("/v1/models/{name}:predict", "/v1/models/{name}/versions/{version}:predict")
_OIP = ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer")
_ROUTE = re.compile(
    r"/v(?P<api>[12])/models/(?P<name>[^/]+?)(?:/versions/(?P<version>[^/]+))?"
    r"(?P<verb>:predict|/infer)"
)
_SUBJECT = re.compile(SUBJECT_PATTERN)
_INTEGER = re.compile(r"\s*[+-]?\d+\s*")
_HEADER_KEY = HEADER.lower().encode("latin-1")


class PredictionRoutes:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        # FastAPI's route objects, so that metrics, access log and audit name the template.
        routes = {getattr(r, "path", None): r for r in [*native_router.routes, *v2_router.routes]}
        self._routes = {
            (api, versioned): routes[templates[versioned]]
            for api, templates in (("1", _NATIVE), ("2", _OIP))
            for versioned in (False, True)
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = scope.pop(ROUTE_KEY, None) or route_of(scope)  # the front door matched it
        if match is None:
            await self.app(scope, receive, send)
            return
        api, name, version = match["api"], match["name"], match["version"]
        scope["route"] = self._routes[(api, version is not None)]
        scope["path_params"] = {"name": name} | ({"version": version} if version else {})
        request = Request(scope, receive)
        try:
            if scope["method"] != "POST":  # GET was "model 'clf:predict' is not loaded"
                method, path = scope["method"], scope["path"]
                raise MethodNotAllowedError(f"method {method} is not allowed on {path}; send POST")
            if api == "1":
                response = await self._predict(request, name, version)
            else:
                response = await infer_with(request, name, version, _header_length(scope))
        except BodyTooLarge:
            raise  # RequestContext answers 413
        except ClientDisconnect:
            return  # gone while sending its body: nobody to answer, nothing was queued
        except McServeError as exc:
            response = await errors.on_mcserve_error(request, exc)
        except RequestValidationError as exc:
            response = await errors.on_validation_error(request, exc)
        except Exception as exc:  # the same 500 (logged, request id quoted) as FastAPI's path
            response = await errors.on_unexpected(request, exc)
        await response(scope, receive, send)

    async def _predict(self, request: Request, name: str, version: str | None) -> Any:
        # Parsing an empty query string cost 8 us a request: look only when there is one.
        subject = request.query_params.get("subject") if request.scope["query_string"] else None
        if subject is not None and not _SUBJECT.fullmatch(subject):
            raise RequestValidationError(
                [
                    {
                        "type": "string_pattern_mismatch",
                        "loc": ("query", "subject"),
                        "msg": f"String should match pattern '{SUBJECT_PATTERN}'",
                        "input": subject,
                    }
                ]
            )
        if not _json_or_absent(request.scope):  # was a body-shape error ("valid dictionary")
            raise UnsupportedMediaTypeError(
                f"Content-Type {request.headers['content-type']!r} is not read here; send the "
                "body as JSON with Content-Type: application/json"
            )
        body = await request.body()
        # The model first: its input shape bounds what the body may hold, checked before the
        # body is parsed (a 5 MB body of a million instances would hold the loop for 0.6 s).
        st = state(request)
        check_size(body, st.batcher(name, version).model.manifest.inputs, st.settings.max_instances)
        payload = await off_loop(lambda: _parse(body), nbytes=len(body))
        return await predict_with(request, payload, name, version, subject)


def _parse(body: bytes) -> PredictRequest:
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInputError(
            "invalid request: body: cannot be parsed; send JSON in UTF-8"
        ) from None
    try:
        return PredictRequest.model_validate_json(body)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
        ) from None


ROUTE_KEY = "mcserve.route"  # the front door's match, handed on in the scope


def route_of(scope: Scope) -> re.Match[str] | None:
    """The prediction route this request asks for, or None (then FastAPI answers it)."""
    if scope["type"] != "http":
        return None
    match = _ROUTE.fullmatch(scope["path"])
    if match is None or (match["api"] == "1") != (match["verb"] == ":predict"):
        return None  # /v1/.../infer and /v2/...:predict are no routes
    return match


def _header_length(scope: Scope) -> int | None:
    """The binary extension's header length, checked as FastAPI checks `int | None, ge=0`."""
    for key, value in scope["headers"]:
        if key == _HEADER_KEY:
            text = value.decode("latin-1")
            if not _INTEGER.fullmatch(text):
                kind, msg = "int_parsing", "unable to parse string as an integer"
            elif int(text) < 0:
                kind, msg = "greater_than_equal", "Input should be greater than or equal to 0"
            else:
                return int(text)
            if kind == "int_parsing":
                msg = "Input should be a valid integer, " + msg
            raise RequestValidationError(
                [{"type": kind, "loc": ("header", HEADER), "msg": msg, "input": text}]
            )
    return None


def _json_or_absent(scope: Scope) -> bool:
    """FastAPI parses a body as JSON when its type is absent or JSON; others go to FastAPI."""
    for key, value in scope["headers"]:
        if key == b"content-type":
            return b"json" in value.lower()
    return True
