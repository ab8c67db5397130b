"""The app factory: lifespan loads and warms the models, one compute worker, batchers."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import FastAPI, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response

from service.api.cds.routes import router as cds_router
from service.api.common import audit, errors
from service.api.common.auth import ApiKeyGuard
from service.api.common.call import json_response
from service.api.common.encoding import ContentEncoding
from service.api.common.inflight import BodyBudget
from service.api.common.lifecycle import ModelControl
from service.api.common.middleware import RequestContext
from service.api.common.schemas import Health
from service.api.common.state import AppState
from service.api.front import McServeApp
from service.api.native.routes import FAST_ENDPOINTS as native_fast
from service.api.native.routes import router as native_router
from service.api.oip.repository import router as repository_router
from service.api.oip.routes import FAST_ENDPOINTS as oip_fast
from service.api.oip.routes import router as v2_router
from service.api.pages import docs
from service.bundle.load import TrustPolicy
from service.engine import frozen
from service.engine.compute_child import WorkerSpec
from service.engine.device import configure_threads
from service.engine.registry import ModelFactory, Registry
from service.engine.worker import ComputeProcess
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
    factory = ModelFactory(TrustPolicy.from_settings(settings), model_kwargs)
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mcserve-compute")
    remote = None
    if settings.compute_process:
        remote = ComputeProcess(
            WorkerSpec(factory, threads),
            stall_s=settings.compute_stall_s,
            stuck_s=settings.compute_stuck_s,
        )
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


def create_app(settings: Settings | None = None, *, fast_path: bool = True) -> FastAPI:
    """The app. `fast_path=False`: the prediction routes go through FastAPI's routing too (the
    same endpoints; for the parity test and to rule the front door out when debugging)."""
    settings = settings or Settings()
    metrics = Metrics(created=settings.metrics_created)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        st = build_state(settings)
        app.state.mcserve = st
        await audit.start(app, settings, metrics)
        control = app.state.model_control = ModelControl(st, metrics)
        if st.remote is not None:  # a dead compute process: unready until restarted and loaded
            st.remote.on_restart = control.prepare_all
            st.checks.append(st.remote.not_ready_reason)
        await control.sync()  # every bundle on disk, in every control mode
        st.counted = {e.name for e in st.registry.entries()}  # each counts for readiness
        st.started = True
        poller = None
        if settings.model_control == "poll":
            poller = asyncio.ensure_future(control.poll_forever(settings.poll_interval_s))
        # Full collections over torch's and FastAPI's long-lived objects caused 100-230 ms
        # latency spikes; freezing what start-up created removes them.
        frozen.freeze()
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
        redirect_slashes=False,  # a trailing slash: errors.on_http_error says where to go
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
    # which answers preflights before the API-key guard, which comes before any decompression
    # of the body (ContentEncoding); on every route (front.py).
    budget = app.state.body_budget = BodyBudget(settings.inflight_body_limit)
    metrics.watch_bodies(budget)
    for cls, kwargs in _layers(settings, metrics, budget, lambda: _draining(app)):
        app.add_middleware(cls, **kwargs)
    app.fast_path = fast_path
    app.fast_endpoints = frozenset((*native_fast, *oip_fast))
    return app


def _draining(app: FastAPI) -> bool:
    st = getattr(app.state, "mcserve", None)  # None until the lifespan has built it
    return bool(st is not None and st.draining)


def _layers(
    settings: Settings, metrics: Metrics, budget: BodyBudget, draining: Callable[[], bool]
) -> list[tuple[Any, dict[str, Any]]]:
    """Our middleware, innermost first, as (class, keyword arguments)."""
    layers: list[tuple[Any, dict[str, Any]]] = [
        (ContentEncoding, {"max_body_bytes": settings.max_body_bytes, "budget": budget}),
        (
            ApiKeyGuard,
            {
                "keys": settings.api_keys,
                "protect_metrics": settings.protect_metrics,
                "protect_docs": settings.protect_docs,
            },
        ),
    ]
    if settings.cors_origins:
        cors: dict[str, Any] = {
            "allow_origins": settings.cors_origins,
            "allow_methods": ["GET", "HEAD", "POST", "OPTIONS"],
            "allow_headers": ["Authorization", "Content-Type", "X-API-Key", "X-Request-ID"],
            "expose_headers": ["X-Request-ID", "Retry-After"],
        }
        layers.append((CORSMiddleware, cors))
    context = {
        "max_body_bytes": settings.max_body_bytes,
        "metrics": metrics,
        "draining": draining,
        "budget": budget,
    }
    layers.append((RequestContext, context))
    return layers
