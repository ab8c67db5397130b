"""The app factory: lifespan loads and warms the models, one compute worker, batchers."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import numpy as np
import torch
from fastapi import FastAPI, Request
from starlette.responses import Response

from service.api import errors
from service.api.middleware import RequestContext
from service.api.native import json_response
from service.api.native import router as native_router
from service.api.schemas import Health
from service.api.state import AppState
from service.engine.batcher import Batcher
from service.engine.device import configure_threads
from service.engine.model import PredictParams, ServedModel
from service.engine.registry import Registry
from service.settings import Settings

log = logging.getLogger("mcserve")


def _device(settings: Settings) -> torch.device:
    if settings.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(settings.device)


def warm(model: ServedModel) -> None:
    """One MC and one deterministic call: first-call costs never land on a client."""
    x = np.zeros((1, *model.manifest.inputs.shape), dtype=np.float32)
    model.predict(
        x, PredictParams(samples=model.manifest.defaults.samples, confidence=(0.9,), seed=0)
    )
    model.predict(x, PredictParams(samples=2, confidence=(0.9,), mode="deterministic"))


def build_state(settings: Settings) -> AppState:
    threads = configure_threads(settings.threads)
    registry = Registry.with_policy(
        settings.model_dir,
        settings.trust_policy(),
        device=_device(settings),
        row_budget=settings.forward_rows,
        onnx_threads=threads,
    )
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mcserve-compute")
    return AppState(settings=settings, registry=registry, executor=executor)


def add_batcher(st: AppState, model: ServedModel) -> None:
    s = st.settings
    b = Batcher(
        model,
        st.executor,
        max_batch_rows=s.max_batch_rows,
        max_queue_rows=s.max_queue_rows,
        max_delay_s=s.max_delay_ms / 1000.0,
        batching=s.batching,
    )
    b.start()
    st.batchers[(model.name, model.version)] = b


async def startup(st: AppState) -> None:
    loop = asyncio.get_running_loop()
    entries = await loop.run_in_executor(st.executor, st.registry.load_all)
    for e in entries:
        if e.model is None:
            log.warning("model not loaded", extra={"model": e.name, "reason": e.error})
            continue
        await loop.run_in_executor(st.executor, warm, e.model)
        add_batcher(st, e.model)
    st.started = True
    # Full collections over torch's and FastAPI's long-lived objects caused 100-230 ms spikes.
    gc.collect()
    gc.freeze()


async def shutdown(st: AppState) -> None:
    st.draining = True
    await asyncio.gather(*(b.stop(drain=True) for b in st.batchers.values()))
    st.executor.shutdown(wait=True)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        st = build_state(settings)
        app.state.mcserve = st
        await startup(st)
        yield
        await shutdown(st)

    app = FastAPI(
        title="mcserve",
        version="0.1.0",
        summary="Neural network predictions with Monte Carlo dropout uncertainty",
        lifespan=lifespan,
    )
    errors.install(app)
    app.include_router(native_router)

    @app.get("/healthz", response_model=Health, tags=["health"])
    async def healthz() -> Response:
        return json_response({"status": "live"})

    @app.get("/readyz", response_model=Health, tags=["health"], responses={503: {"model": Health}})
    async def readyz(request: Request) -> Response:
        reasons = request.app.state.mcserve.not_ready_reasons()
        if reasons:
            return json_response({"status": "not ready", "reasons": reasons}, 503)
        return json_response({"status": "ready"})

    app.add_middleware(RequestContext, max_body_bytes=settings.max_body_bytes)
    return app
