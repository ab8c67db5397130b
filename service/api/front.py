"""The one ASGI entry: our middleware, built once, around a dispatch that calls the prediction
endpoints directly and hands every other request to FastAPI's routes (which have no middleware
of their own).

    ServerErrorMiddleware (Starlette's: an exception outside a handler is a logged 500, errors.py)
      RequestContext, CORS, ApiKeyGuard (app.py), and any middleware added to the app later
        HeadAsGet: HEAD -> GET, its answer's body dropped
          FastRoutes: POST /v1/models/{name}[/versions/{v}]:predict, /v2/models/.../infer
            -> the route's own endpoint, called with (request, path parameters)
          otherwise FastAPI: ExceptionMiddleware (errors.py) -> router

Measured with py-spy at concurrency 64: the event loop, not the engine, limits requests/s, and
much of its time went to layers a prediction does not need: FastAPI's exception, exit-stack and
body-limit wrappers around every send and receive, matching the path against every route, and
dependency solving. The prediction endpoints therefore read their request themselves (native/
predict.py, oip/infer.py, common/fields.py): FastAPI's route documents them and, with the fast
path off (`create_app(fast_path=False)`), answers them through the very same code. The method
check stays here in both modes: FastAPI routed a GET of `:predict` to the metadata route ("model
'clf:predict' is not loaded").

HEAD is answered as GET without the body (RFC 9110, 9.3.2) for every route: FastAPI's routes
answer only the methods they declare, so a link checker's or load balancer's HEAD was a 405.

FastAPI's own exception telemetry and `max_body_size` are left out of the stack: the body limit
is ours (RequestContext) and errors are counted in our metrics.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Collection, Iterator
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.asyncexitstack import AsyncExitStackMiddleware
from fastapi.routing import APIRoute
from starlette._utils import get_route_path
from starlette.middleware.errors import ServerErrorMiddleware
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.common import errors
from service.errors import MethodNotAllowedError, shown_name


class FastRoutes:
    """The routes whose endpoints are in `endpoints`, answered without FastAPI's routing: the
    path is matched by the route's own pattern, the endpoint is called with the request and the
    path parameters, and its errors are mapped by errors.py as FastAPI's handlers map them.
    Another method than POST is 405 with `Allow: POST` (FastAPI would try the other routes).
    With `call` False only that check is made here and a POST goes on to FastAPI."""

    def __init__(
        self,
        app: ASGIApp,
        routes: list[BaseRoute],
        endpoints: Collection[Callable[..., Any]],
        call: bool = True,
    ) -> None:
        self.app = app
        self.call = call
        self.routes = [r for r in _api_routes(routes) if r.endpoint in endpoints]
        if len(self.routes) != len(endpoints):
            raise TypeError("a fast endpoint is not a route of this app (an unseen inclusion?)")
        for route in self.routes:
            names = set(inspect.signature(route.endpoint).parameters) - {"request"}
            if names != set(route.param_convertors):
                raise TypeError(f"{route.path}: the front door passes only the path and request")
        self._suffixes = tuple(r.path.rsplit("}", 1)[-1] for r in self.routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = get_route_path(scope)
            if path.endswith(self._suffixes):
                for route in self.routes:
                    match = route.path_regex.match(path)
                    if match is None:
                        continue
                    if self.call or scope["method"] != "POST":
                        await self._answer(route, match.groupdict(), scope, receive, send)
                        return
                    break
        await self.app(scope, receive, send)

    async def _answer(
        self, route: APIRoute, params: dict[str, str], scope: Scope, receive: Receive, send: Send
    ) -> None:
        scope["route"] = route  # metrics, access log and audit name the template
        scope["endpoint"] = route.endpoint
        scope["path_params"] = params
        request = Request(scope, receive)
        try:
            if scope["method"] != "POST":  # GET was "model 'clf:predict' is not loaded"
                method, path = scope["method"], scope["path"]
                raise MethodNotAllowedError(
                    f"method {method} is not allowed on {shown_name(path)}; send POST"
                )
            response = await route.endpoint(request=request, **params)
        except ClientDisconnect:
            return  # gone while sending its body: nobody to answer, nothing was queued
        except Exception as exc:
            response = await errors.respond(request, exc)
        await response(scope, receive, send)


class HeadAsGet:
    """HEAD answered as GET with the same headers (Content-Length included) and no body."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        # The same scope, not a copy: the route the router finds there names the request in
        # metrics and the access log (a copy's left them "(unmatched)").
        scope["method"] = "GET"
        try:
            await self.app(scope, receive, headers_only)
        finally:
            scope["method"] = "HEAD"


def _api_routes(routes: list[BaseRoute]) -> Iterator[APIRoute]:
    """Every APIRoute, those of included routers too (FastAPI 0.16x keeps routers nested)."""
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from _api_routes(inner.routes)


class McServeApp(FastAPI):
    """FastAPI, whose middleware stack is ours, built once, with the front door inside it."""

    fast_path: bool = True
    fast_endpoints: frozenset[Callable[..., Any]] = frozenset()

    def build_middleware_stack(self) -> ASGIApp:
        handlers: dict[Any, Any] = {}
        on_unexpected = None
        for key, value in self.exception_handlers.items():
            if key in (500, Exception):
                on_unexpected = value
            else:
                handlers[key] = value
        app: ASGIApp = ExceptionMiddleware(AsyncExitStackMiddleware(self.router), handlers)
        app = HeadAsGet(FastRoutes(app, self.router.routes, self.fast_endpoints, self.fast_path))
        for cls, args, kwargs in reversed(self.user_middleware):  # the first added is innermost
            app = cls(app, *args, **kwargs)
        return ServerErrorMiddleware(app, handler=on_unexpected, debug=self.debug)
