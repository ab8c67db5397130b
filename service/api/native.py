"""The native JSON API: /v1/models, model metadata and :predict (KServe V1, extended)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

import numpy as np
import orjson
from fastapi import APIRouter, Body, Path, Query, Request
from starlette.responses import Response

from service.api import audit, examples
from service.api.auth import allowed_models
from service.api.schemas import (
    ErrorBody,
    ModelList,
    ModelMetadata,
    PredictParameters,
    PredictRequest,
    PredictResponse,
)
from service.api.state import AppState
from service.clinical import fhir
from service.encode import response_json
from service.engine.adaptive import Adaptive, first_passes
from service.engine.batcher import Batcher
from service.engine.inputs import to_array
from service.engine.model import (
    Prediction,
    PredictParams,
    ServedModel,
    default_interval,
    resolve_interval,
)
from service.engine.summaries import check_levels
from service.engine.text import encode_texts
from service.errors import CancelledError, InvalidInputError

router = APIRouter(prefix="/v1", tags=["native"])
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (404, 413, 422, 429, 500, 503, 504)
}
Name = Annotated[str, Path(description="model name", openapi_examples=examples.names())]
Version = Annotated[str, Path(description="model version", openapi_examples=examples.VERSIONS)]
Body_ = Annotated[PredictRequest, Body(openapi_examples=examples.predict())]
FHIR_JSON = "application/fhir+json"
SUBJECT_PATTERN = r"^(Patient|Group)/[A-Za-z0-9\-.]{1,64}$"
Subject = Annotated[
    str | None,
    Query(
        pattern=SUBJECT_PATTERN,
        description="with 'Accept: application/fhir+json': the FHIR subject, e.g. Patient/123; "
        "the answer is then a RiskAssessment (classifier) or Observation (regressor)",
    ),
]


T = TypeVar("T")
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


def state(request: Request) -> AppState:
    st: AppState = request.app.state.mcserve
    return st


def json_response(payload: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json")


@router.get("/models", response_model=ModelList)
async def list_models(request: Request) -> Response:
    """The models this request's key may use (every model without keys), with the reasons the
    others failed to load, without server paths."""
    reg = state(request).registry
    allowed = allowed_models(request.state)
    by_name: dict[str, list[Any]] = {}
    for e in reg.entries():
        if allowed is None or e.name in allowed:
            by_name.setdefault(e.name, []).append(e)
    models = [
        {
            "name": name,
            "task": next((e.model.manifest.task for e in es if e.model), None),
            "versions": [
                {"version": e.version, "ready": e.ready, "reason": reg.reason(e)} for e in es
            ],
            "ready": any(e.ready for e in es),
        }
        for name, es in sorted(by_name.items())
    ]
    return json_response({"models": models})


def metadata(model: ServedModel, versions: list[str]) -> dict[str, Any]:
    m = model.manifest
    return {
        "name": m.name,
        "version": m.version,
        "versions": versions,
        "digest": model.digest,
        "task": m.task,
        "intended_use": m.intended_use,
        "inputs": m.inputs.model_dump(mode="json"),
        "outputs": m.outputs.model_dump(mode="json"),
        "defaults": {**m.defaults.model_dump(mode="json"), "interval": default_interval(m)},
        "aleatoric": m.aleatoric.model_dump(mode="json"),
        "training": {"metrics": m.training.metrics, "provenance": m.training.provenance},
        "calibration": model.calibrator.metadata(),
        "referral": model.calibrator.policy.model_dump(mode="json"),
        "backend": {"mc": "torch", "deterministic": "onnxruntime" if model.onnx else "torch"},
        "device": model.device,
        "dropout": [d.model_dump(mode="json") for d in m.dropout],
        "mc": mc_metadata(model),
    }


def mc_metadata(model: ServedModel) -> dict[str, Any]:
    """The dropout-site setting: the default and what a request may choose instead."""
    n, default = len(model.manifest.dropout), model.manifest.sampled_sites
    return {
        "dropout_sites": "all" if default is None else default,
        "sites": n,
        "allowed": f"'all' or k with 1 <= k <= {n} (the last k sites in graph order)",
    }


@router.get("/models/{name}", response_model=ModelMetadata, responses=ERRORS)
async def model_metadata(name: Name, request: Request) -> Response:
    reg = state(request).registry
    model = reg.get(name)
    return json_response(metadata(model, [e.version for e in reg.versions(name)]))


@router.get("/models/{name}/versions/{version}", response_model=ModelMetadata, responses=ERRORS)
async def model_version_metadata(name: Name, version: Version, request: Request) -> Response:
    reg = state(request).registry
    model = reg.get(name, version)
    return json_response(metadata(model, [e.version for e in reg.versions(name)]))


def ignored(p: PredictParameters) -> list[str]:
    """A warning naming the parameters deterministic mode does not use (it was silent)."""
    if p.mode != "deterministic":
        return []
    names = (
        "samples",
        "max_samples",
        "tolerance",
        "seed",
        "confidence",
        "interval",
        "dropout_sites",
    )
    given = [k for k in names if getattr(p, k) is not None]
    if not given:
        return []
    return [f"mode=deterministic ignores {', '.join(given)}: dropout is off, one pass is run"]


def to_params(p: PredictParameters, model: ServedModel, max_samples: int) -> PredictParams:
    d = model.manifest.defaults
    conf = p.confidence if p.confidence is not None else d.confidence
    levels = check_levels([conf] if isinstance(conf, float | int) else conf)
    auto = _adaptive(p, max_samples) if p.mode == "mc" else None
    if auto is not None:  # the first chunk's passes; more are queued until the answer is sure
        interval = p.interval or default_interval(model.manifest)
        samples = first_passes(PredictParams(0, levels, interval=interval), auto)
    else:
        samples = p.samples if isinstance(p.samples, int) else d.samples
    if samples > max_samples:
        raise InvalidInputError(
            f"samples={samples} is over the maximum of {max_samples} (setting max_samples)"
        )
    interval = resolve_interval(
        model.manifest, p.interval, samples=samples, levels=levels, mode=p.mode
    )
    return PredictParams(samples, levels, p.seed, p.mode, interval, auto, p.dropout_sites)


def _adaptive(p: PredictParameters, limit: int) -> Adaptive | None:
    """samples="auto" with its max_samples and tolerance (defaults: the server's maximum and
    Adaptive's tolerance); those two without auto are refused rather than ignored."""
    if p.samples != "auto":
        if p.max_samples is not None or p.tolerance is not None:
            raise InvalidInputError(
                'max_samples and tolerance apply to samples=auto only; send samples="auto" '
                "or leave them out"
            )
        return None
    most = p.max_samples if p.max_samples is not None else limit
    if most > limit:
        raise InvalidInputError(
            f"max_samples={most} is over the server's maximum of {limit} (setting max_samples)"
        )
    if p.tolerance is None:
        return Adaptive(max_samples=most)
    return Adaptive(max_samples=most, tolerance=p.tolerance)


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
) -> Prediction:
    """The one engine call of every adapter: queue, wait, drop the work if the client goes.

    The answer's audit record is queued here, before any adapter replies (`card_uuid`: the CDS
    card that will carry it); 503 when it cannot be (audit fails closed)."""
    deadline = batcher.clock() + timeout_s if timeout_s else None
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
    # For the access log (RequestContext): which version answered and how the time was spent.
    state = request.state
    state.model, state.version = batcher.model.name, batcher.model.version
    if pred.timing:
        state.batch_rows = int(pred.timing["batch_rows"])
        state.queue_ms = round(pred.timing["queue_s"] * 1000, 3)
        state.compute_ms = round(pred.timing["compute_s"] * 1000, 3)
    audit.record(request, batcher.model, x, params, pred, card_uuid)
    return pred


async def predict_with(
    request: Request,
    body: PredictRequest,
    name: str,
    version: str | None,
    subject: str | None = None,
) -> Response:
    st = state(request)
    batcher = st.batcher(name, version)
    model = batcher.model
    as_fhir = FHIR_JSON in request.headers.get("accept", "")
    if as_fhir and subject is None:
        raise InvalidInputError(
            f"Accept: {FHIR_JSON} needs the query parameter subject (e.g. ?subject=Patient/123)"
        )
    params = to_params(body.parameters, model, st.settings.max_samples)
    spec, limit = model.manifest.inputs, st.settings.max_instances
    values = len(body.instances) * math.prod(spec.shape)
    notes = None
    if spec.text is not None:  # text models: strings (or {"text": ...}) to token ids
        text, tokenizer = spec.text, model.bundle.tokenizer
        batch = await off_loop(
            lambda: encode_texts(body.instances, tokenizer, text, limit), values=values
        )
        x = batch.ids
        notes = batch.notes()
    else:
        x = await off_loop(lambda: to_array(body.instances, spec, limit), values=values)
    timeout = body.parameters.timeout_ms
    pred = await run(
        request, batcher, x, params, timeout / 1000.0 if timeout else None, input_notes=notes
    )
    pred.warnings.extend(ignored(body.parameters))
    if as_fhir and subject is not None:
        return fhir_response(request, model, pred, subject)
    return Response(response_json(model, pred), media_type="application/json")


def fhir_response(request: Request, model: ServedModel, pred: Prediction, subject: str) -> Response:
    """The same FHIR resource a CDS card carries (service.clinical.fhir), for the native API."""
    cds = getattr(request.app.state, "cds", None)
    ctx = fhir.Context(
        subject=subject,
        when=datetime.now(UTC),
        version=state(request).settings.fhir_version,
        mapping=cds.catalogue.mapping_for(model) if cds is not None else None,
    )
    doc = fhir.answer(model, pred, ctx)
    return Response(orjson.dumps(doc), media_type=FHIR_JSON)


@router.post("/models/{name}:predict", response_model=PredictResponse, responses=ERRORS)
async def predict(name: Name, body: Body_, request: Request, subject: Subject = None) -> Response:
    return await predict_with(request, body, name, None, subject)


@router.post(
    "/models/{name}/versions/{version}:predict", response_model=PredictResponse, responses=ERRORS
)
async def predict_version(
    name: Name, version: Version, body: Body_, request: Request, subject: Subject = None
) -> Response:
    return await predict_with(request, body, name, version, subject)
