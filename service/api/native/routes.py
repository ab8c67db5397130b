"""The native JSON API: /v1/models, model metadata and :predict (KServe V1, extended)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from starlette.responses import Response

from service.api.common import examples
from service.api.common.auth import allowed_models
from service.api.common.call import json_response, state
from service.api.common.fields import inline_schema
from service.api.common.parameters import mc_metadata
from service.api.common.schemas import ErrorBody
from service.api.native.predict import SUBJECT, predict_with
from service.api.native.schemas import (
    ModelList,
    ModelMetadata,
    PredictRequest,
    PredictResponse,
)
from service.engine.model import ServedModel
from service.engine.params import default_interval

router = APIRouter(prefix="/v1", tags=["native"])
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (404, 413, 422, 429, 500, 503, 504)
}
Name = Annotated[str, Path(description="model name", openapi_examples=examples.names())]
Version = Annotated[str, Path(description="model version", openapi_examples=examples.VERSIONS)]
# The body and the query are read by the endpoint itself (`native/predict.py`), so that the front
# door can call it without FastAPI's routing; they are documented here.
PREDICT_DOC: dict[str, Any] = {
    "parameters": [SUBJECT.openapi()],
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": inline_schema(PredictRequest),
                "examples": examples.predict(),
            }
        },
    },
}


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


@router.get("/models/{name}", response_model=ModelMetadata, responses=ERRORS)
async def model_metadata(name: Name, request: Request) -> Response:
    reg = state(request).registry
    model = reg.get(name)
    return json_response(metadata(model, reg.ready_versions(name)))


@router.get("/models/{name}/versions/{version}", response_model=ModelMetadata, responses=ERRORS)
async def model_version_metadata(name: Name, version: Version, request: Request) -> Response:
    reg = state(request).registry
    model = reg.get(name, version)
    return json_response(metadata(model, reg.ready_versions(name)))


@router.post(
    "/models/{name}:predict",
    response_model=PredictResponse,
    responses=ERRORS,
    openapi_extra=PREDICT_DOC,
)
async def predict(name: Name, request: Request) -> Response:
    return await predict_with(request, name, None)


@router.post(
    "/models/{name}/versions/{version}:predict",
    response_model=PredictResponse,
    responses=ERRORS,
    openapi_extra=PREDICT_DOC,
)
async def predict_version(name: Name, version: Version, request: Request) -> Response:
    return await predict_with(request, name, version)


# Called by the front door with (request, path parameters) only (service/api/front.py).
FAST_ENDPOINTS = (predict, predict_version)
