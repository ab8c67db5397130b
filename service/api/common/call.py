"""The one engine call every adapter shares: queue the work, wait, drop it if the client goes,
and queue the audit record; plus what each handler needs around it (the app state, a hop off
the event loop for large bodies, a JSON response)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import orjson
from fastapi import Request
from starlette.responses import Response

from service.api.common import audit
from service.api.common.state import AppState
from service.engine.batcher import Batcher
from service.engine.model import Prediction
from service.engine.params import PredictParams
from service.errors import CancelledError

T = TypeVar("T")
U = TypeVar("U")
# Above these sizes a body's parse and conversion run on a worker thread, so the event loop goes
# on answering others in between (the C parsers hold the GIL while they run, so what bounds a
# stall is check_size). Measured on 2 busy vCPUs: a hop to a thread and back 0.1-0.3 ms, the
# parse of a 64 KB /v1 body 0.5 ms: below that, the hop would cost more than it frees.
OFF_LOOP_BYTES = 64 * 1024
OFF_LOOP_VALUES = 8192


async def off_loop(fn: Callable[[], T], nbytes: int = 0, values: int = 0) -> T:
    """fn() on a worker thread for a body of more than OFF_LOOP_BYTES or OFF_LOOP_VALUES, else
    here (a small body converts faster than the hop)."""
    if nbytes <= OFF_LOOP_BYTES and values <= OFF_LOOP_VALUES:
        return fn()
    return await asyncio.to_thread(fn)


async def featurise(
    request: Request,
    model: str,
    kind: str,
    fn: Callable[[], T],
    nbytes: int = 0,
    values: int = 0,
    started: float | None = None,
) -> T:
    """off_loop(fn) for a request's inputs (`kind`: audio, text or numbers), timed from
    `started` (perf_counter; the checks of their form before it) or from now: the access log's
    featurise_ms and mcserve_featurise_duration_seconds. A WAV file's decoding and features
    were seen only as request time less queue and compute time."""
    start = time.perf_counter() if started is None else started
    out = await off_loop(fn, nbytes, values)
    seconds = time.perf_counter() - start
    request.state.featurise_ms = round(seconds * 1000, 3)
    request.app.state.metrics.observe_featurise(model, kind, seconds)
    return out


async def featurise_with_room(
    request: Request,
    batcher: Batcher,
    params: PredictParams,
    kind: str,
    check: Callable[[], list[U]],
    make: Callable[[list[U]], T],
    nbytes: int,
    per_item: int,
) -> T:
    """A text or audio request's inputs: `check` (what needs no tokenizer or decoding: a
    malformed input is its 4xx), then the queue's room for that many (`check_room`: a full
    queue refuses before the costly part), then `make` from what `check` gave, timed from the
    start as `featurise`. `per_item`: padded values per input (what puts the work off the
    loop). What `check` gave is let go here, not held through the queue and compute."""
    started = time.perf_counter()
    items = await off_loop(check, nbytes)
    batcher.check_room(len(items), params)
    values = len(items) * per_item
    return await featurise(
        request, batcher.model.name, kind, lambda: make(items), nbytes, values, started
    )


def state(request: Request) -> AppState:
    st: AppState = request.app.state.mcserve
    return st


def json_response(payload: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json")


async def _until_disconnect(request: Request, task: asyncio.Future[Any]) -> None:
    """Cancel `task` when the client goes away, so its queued work is dropped."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            task.cancel()
            return


async def run(
    request: Request,
    batcher: Batcher,
    x: np.ndarray,
    params: PredictParams,
    timeout_s: float | None,
    card_uuid: str | None = None,
    input_notes: list[dict[str, Any]] | None = None,
    warnings: list[str] | None = None,
    representation: dict[str, str] | None = None,
    from_arrival: bool = True,
) -> Prediction:
    """The one engine call of every adapter: queue, wait, drop the work if the client goes.

    `timeout_s` counts from the request's arrival, or with `from_arrival` False from here (a
    CDS hook call's deadline bounds its compute: its token and FHIR fetches come first).

    The answer's audit record is queued here, before any adapter replies (`card_uuid`: the CDS
    card that will carry it); 503 when it cannot be (audit fails closed). `input_notes` and
    `warnings` (the adapter's own, e.g. ignored parameters) join the answer before it is
    recorded: the record encodes the answer once, and the reply reuses that encoding.
    `representation`: how the adapter sends the answer when not as the native JSON (the record
    says so: /v1 as FHIR)."""
    default = request.app.state.mcserve.settings.request_timeout_ms
    if timeout_s is None and default is not None:  # the operator's bound on any request
        timeout_s = default / 1000.0
    # `is not None`: 5e-324 ms is a deadline (it was read as none), already passed
    # From the request's arrival: reading, parsing and tokenizing its body count (9 texts of
    # 100 kB answered 200 at 5 times their timeout_ms, the clock started after them).
    arrived = getattr(request.state, "arrived", None) if from_arrival else None
    spent = time.monotonic() - arrived if arrived is not None else 0.0
    deadline = batcher.clock() + timeout_s - spent if timeout_s is not None else None
    future = batcher.enqueue(x, params, deadline)  # a future, not a task: one task less
    watcher = future.get_loop().create_task(_until_disconnect(request, future))
    try:
        pred = await future
    except asyncio.CancelledError:
        if watcher.done():
            raise CancelledError("the client disconnected; its work was dropped") from None
        raise
    finally:
        watcher.cancel()
    pred.input_notes = input_notes  # before the audit record encodes the answer
    if warnings:
        pred.warnings.extend(warnings)
    # For the access log (RequestContext): which version answered and how the time was spent.
    state = request.state
    state.model, state.version = batcher.model.name, batcher.model.version
    if pred.timing:
        state.batch_rows = int(pred.timing["batch_rows"])
        state.queue_ms = round(pred.timing["queue_s"] * 1000, 3)
        state.compute_ms = round(pred.timing["compute_s"] * 1000, 3)
    audit.record(request, batcher.model, x, params, pred, card_uuid, warnings, representation)
    return pred
