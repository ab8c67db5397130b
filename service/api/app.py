"""The app factory: lifespan loads and warms the models, one compute worker, batchers."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import FastAPI, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request as StarletteRequest
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.cds.routes import router as cds_router
from service.api.common import audit, errors
from service.api.common.auth import ApiKeyGuard
from service.api.common.call import json_response
from service.api.common.lifecycle import ModelControl
from service.api.common.middleware import RequestContext
from service.api.common.schemas import Health
from service.api.common.state import AppState
from service.api.fastpath import ROUTE_KEY, PredictionRoutes, route_of
from service.api.native.routes import router as native_router
from service.api.oip.repository import router as repository_router
from service.api.oip.routes import router as v2_router
from service.api.pages import docs
from service.engine.device import configure_threads
from service.engine.registry import ModelFactory, Registry
from service.engine.worker import ComputeProcess, WorkerSpec
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger("mcserve")


def _device(settings: Settings) -> torch.device:
    if settings.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(settings.device)


def build_state(settings: Settings) -> AppState:
    threads = configure_threads(settings.threads)
    model_kwargs: dict[str, object] = {
        "device": _device(settings),
        "row_budget": settings.forward_rows,
        "fused_masks": settings.fused_masks,
        "onnx_threads": threads,
        "referral_overrides": settings.referral,
    }
    factory = ModelFactory(settings.trust_policy(), model_kwargs)
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mcserve-compute")
    remote = None
    if settings.compute_process:
        remote = ComputeProcess(WorkerSpec(factory, threads))
        # The server's own copies only describe the models and check requests; the compute
        # process computes. Without the mask kernel they never load numba (about 166 MiB).
        factory = ModelFactory(factory.policy, {**model_kwargs, "fused_masks": False})
    registry = Registry(settings.model_dir, factory)
    return AppState(settings=settings, registry=registry, executor=executor, remote=remote)


async def shutdown(st: AppState) -> None:
    st.draining = True
    await asyncio.gather(*(b.stop(drain=True) for b in st.batchers.values()))
    if st.remote is not None:
        await st.remote.close()
    st.executor.shutdown(wait=True)


class McServeApp(FastAPI):
    """FastAPI, with a front door for the prediction routes.

    A prediction passed through Starlette's and FastAPI's own layers (server errors, telemetry,
    body limit, exception handling), each wrapping send and receive, before reaching ours. The
    front door is our middleware (request id, body limit, metrics, access log, CORS, API keys)
    around the prediction routes (fastpath.py), nothing else; every other request takes
    FastAPI's whole stack. Errors map as before (errors.py), an exception outside the handler
    included (what ServerErrorMiddleware does elsewhere).

    So on the prediction routes: middleware added to the app after `create_app` does not run,
    FastAPI's own OpenTelemetry tracing does not see them, and exception handlers are ours
    (errors.py), not the app's `exception_handlers`. Add such layers in `_layers`.
    """

    front: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        front = self.front
        match = route_of(scope) if front is not None else None
        if front is None or match is None:
            await super().__call__(scope, receive, send)
            return
        scope[ROUTE_KEY] = match  # PredictionRoutes takes it from here
        scope["app"] = self  # handlers reach the state through request.app
        if self.root_path:
            scope["root_path"] = self.root_path
        started = False

        async def watched(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            await front(scope, receive, watched)
        except Exception as exc:  # what ServerErrorMiddleware does on the other routes
            if started:
                raise
            response = await errors.on_unexpected(StarletteRequest(scope), exc)
            await response(scope, receive, send)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics(created=settings.metrics_created)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        st = build_state(settings)
        app.state.mcserve = st
        await audit.start(app, settings, metrics)
        control = app.state.model_control = ModelControl(st, metrics)
        await control.sync()  # every bundle on disk, in every control mode
        st.started = True
        poller = None
        if settings.model_control == "poll":
            poller = asyncio.ensure_future(control.poll_forever(settings.poll_interval_s))
        # Full collections over torch's and FastAPI's long-lived objects caused 100-230 ms
        # latency spikes; freezing what start-up created removes them.
        gc.collect()
        gc.freeze()
        # Young collections every 700 allocations walked each request's objects once or twice
        # (5 % of the event loop at concurrency 64, py-spy); every 50,000 they walk only what
        # is still in flight. Cycles are still collected, later.
        thresholds = gc.get_threshold()
        gc.set_threshold(50_000, *thresholds[1:])
        yield
        gc.set_threshold(*thresholds)  # process-wide: as it was, for whatever runs next
        if poller is not None:
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller
        await shutdown(st)
        await audit.stop(app)  # after the drain: every answered prediction is queued

    app = McServeApp(
        title="mcserve",
        version="0.1.0",
        summary="Neural network predictions with Monte Carlo dropout uncertainty",
        lifespan=lifespan,
        docs_url=None,  # served by docs.install, from the package (no CDN)
        redoc_url=None,
    )
    app.state.metrics = metrics
    errors.install(app)
    app.include_router(native_router)
    app.include_router(v2_router)  # Open Inference Protocol
    app.include_router(repository_router)
    app.include_router(cds_router)  # CDS Hooks with FHIR (docs/CLINICAL.md)
    docs.install(app, settings)  # /docs, /redoc, /static and the model pages (HTML)

    @app.get("/healthz", response_model=Health, tags=["health"])
    async def healthz() -> Response:
        return json_response({"status": "live"})

    @app.get("/readyz", response_model=Health, tags=["health"], responses={503: {"model": Health}})
    async def readyz(request: Request) -> Response:
        reasons = request.app.state.mcserve.not_ready_reasons()
        if reasons:
            return json_response({"status": "not ready", "reasons": reasons}, 503)
        return json_response({"status": "ready"})

    @app.get("/metrics", tags=["operations"], response_class=Response)
    async def metrics_endpoint() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # Added innermost first: RequestContext (ids, body limit, access log, metrics) wraps CORS,
    # which answers preflights before the API-key guard. The front door stacks the same layers,
    # in the same order, around the prediction routes (fastpath.py).
    layers = _layers(settings, metrics)
    for cls, kwargs in layers:
        app.add_middleware(cls, **kwargs)
    front: ASGIApp = PredictionRoutes(app.router)  # its fallback is never taken: see __call__
    for cls, kwargs in layers:
        if cls is ApiKeyGuard and not settings.api_keys:
            continue  # no keys: it passes every prediction route (only admin routes need one)
        front = cls(front, **kwargs)
    app.front = front
    return app


def _layers(settings: Settings, metrics: Metrics) -> list[tuple[Any, dict[str, Any]]]:
    """Our middleware, innermost first, as (class, keyword arguments)."""
    layers: list[tuple[Any, dict[str, Any]]] = [
        (
            ApiKeyGuard,
            {
                "keys": settings.api_keys,
                "protect_metrics": settings.protect_metrics,
                "protect_docs": settings.protect_docs,
            },
        )
    ]
    if settings.cors_origins:
        cors: dict[str, Any] = {
            "allow_origins": settings.cors_origins,
            "allow_methods": ["GET", "POST", "OPTIONS"],
            "allow_headers": ["Authorization", "Content-Type", "X-API-Key", "X-Request-ID"],
            "expose_headers": ["X-Request-ID", "Retry-After"],
        }
        layers.append((CORSMiddleware, cors))
    layers.append((RequestContext, {"max_body_bytes": settings.max_body_bytes, "metrics": metrics}))
    return layers
