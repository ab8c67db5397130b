"""The Open Inference Protocol at /v2 (KServe V2, Triton, MLServer), with binary tensors.

A thin translation over the engine call every adapter shares (`common.call.run`) and parameter
conversion (`common.parameters.to_params`); uncertainty travels as extra named output tensors
(`oip.outputs`). Errors are mapped in `common/errors.py`: 400 for a bad request, body
`{"error": ...}` (what tritonclient reads).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from starlette.responses import Response

from service.api.common import examples
from service.api.common.call import json_response, state
from service.api.common.fields import inline_schema
from service.api.common.parameters import mc_metadata
from service.api.oip.binary import HEADER, input_datatype
from service.api.oip.infer import HEADER_LENGTH, infer_with
from service.api.oip.outputs import PLATFORM, specs
from service.api.oip.schemas import (
    InferRequest,
    InferResponse,
    Live,
    ModelMetadata,
    ModelReady,
    Ready,
    ServerMetadata,
    V2Error,
)
from service.engine.model import ServedModel
from service.errors import ModelNotReadyError

router = APIRouter(prefix="/v2", tags=["open inference protocol"])
# "4XX" also keeps FastAPI from documenting its 422, which /v2 never answers (400 instead).
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": V2Error} for code in (400, 404, 413, 429, 500, 503, 504, "4XX")
}
EXTENSIONS = ["binary_tensor_data"]

Name = Annotated[str, Path(description="model name", openapi_examples=examples.names())]
Version = Annotated[str, Path(description="model version", openapi_examples=examples.VERSIONS)]
# The body and the header are read by the endpoint itself (`oip/infer.py`), so that the front
# door can call it without FastAPI's routing; they are documented here.
INFER_DOC: dict[str, Any] = {
    "parameters": [HEADER_LENGTH.openapi()],
    "requestBody": {
        "required": True,
        "description": "JSON; with the binary tensor extension, the JSON header is followed by "
        f"the input bytes and `{HEADER}` gives the header's length",
        "content": {
            "application/json": {
                "schema": inline_schema(InferRequest),
                "examples": examples.infer(),
            }
        },
    },
}
INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "outputs as JSON data, or a JSON header (its length in "
        f"`{HEADER}`) followed by the binary outputs",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    },
    **ERRORS,
}


@router.get("/health/live", response_model=Live)
async def live() -> Response:
    return json_response({"live": True})


@router.get("/health/ready", response_model=Ready, responses={503: {"model": Ready}})
async def ready(request: Request) -> Response:
    """Same meaning as /readyz: every required model loaded and warmed, not draining."""
    reasons = state(request).not_ready_reasons()
    if reasons:
        return json_response({"ready": False, "error": "not ready: " + "; ".join(reasons)}, 503)
    return json_response({"ready": True})


def extensions(request: Request) -> list[str]:
    """The binary tensor extension, and the model repository one where model control is
    explicit (its routes are refused otherwise)."""
    explicit = request.app.state.mcserve.settings.model_control == "explicit"
    return [*EXTENSIONS, "model_repository"] if explicit else EXTENSIONS


@router.get("", response_model=ServerMetadata)
async def server_metadata(request: Request) -> Response:
    return json_response(
        {"name": "mcserve", "version": request.app.version, "extensions": extensions(request)}
    )


def metadata(model: ServedModel, versions: list[str]) -> dict[str, Any]:
    spec = model.manifest.inputs
    return {
        "name": model.name,
        "versions": versions,
        "platform": PLATFORM,
        "inputs": [
            {"name": spec.name, "datatype": "BYTES", "shape": [-1]}
            if spec.text is not None or spec.audio is not None
            else {"name": spec.name, "datatype": input_datatype(spec), "shape": [-1, *spec.shape]}
        ],
        "outputs": [s.metadata() for s in specs(model)],
        # mcserve's own: the dropout-site setting, chosen per request by `dropout_sites`.
        "parameters": mc_metadata(model),
    }


async def metadata_of(request: Request, name: str, version: str | None) -> Response:
    reg = state(request).registry
    model = reg.get(name, version)
    return json_response(metadata(model, reg.ready_versions(name)))


@router.get("/models/{name}", response_model=ModelMetadata, responses=ERRORS)
async def model_metadata(name: Name, request: Request) -> Response:
    return await metadata_of(request, name, None)


@router.get("/models/{name}/versions/{version}", response_model=ModelMetadata, responses=ERRORS)
async def model_version_metadata(name: Name, version: Version, request: Request) -> Response:
    return await metadata_of(request, name, version)


async def ready_of(request: Request, name: str, version: str | None) -> Response:
    st = state(request)
    model = st.registry.get(name, version)
    if st.draining or (model.name, model.version) not in st.batchers:
        raise ModelNotReadyError(
            f"model '{model.name}' version '{model.version}' is not ready: "
            + ("the server is shutting down" if st.draining else "it is warming up")
        )
    return json_response({"name": model.name, "version": model.version, "ready": True})


@router.get("/models/{name}/ready", response_model=ModelReady, responses=ERRORS)
async def model_ready(name: Name, request: Request) -> Response:
    return await ready_of(request, name, None)


@router.get("/models/{name}/versions/{version}/ready", response_model=ModelReady, responses=ERRORS)
async def model_version_ready(name: Name, version: Version, request: Request) -> Response:
    return await ready_of(request, name, version)


@router.post(
    "/models/{name}/infer",
    response_model=InferResponse,
    responses=INFER_RESPONSES,
    openapi_extra=INFER_DOC,
)
async def infer(name: Name, request: Request) -> Response:
    return await infer_with(request, name, None)


@router.post(
    "/models/{name}/versions/{version}/infer",
    response_model=InferResponse,
    responses=INFER_RESPONSES,
    openapi_extra=INFER_DOC,
)
async def infer_version(name: Name, version: Version, request: Request) -> Response:
    return await infer_with(request, name, version)


# Called by the front door with (request, path parameters) only (service/api/front.py).
FAST_ENDPOINTS = (infer, infer_version)
