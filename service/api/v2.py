"""The Open Inference Protocol at /v2 (KServe V2, Triton, MLServer), with binary tensors.

A thin translation over the native adapter's engine call (`native.run`) and parameter conversion
(`native.to_params`); uncertainty travels as extra named output tensors (`v2_outputs`). Errors are
mapped in `errors.py`: 400 for a bad request, body `{"error": ...}` (what tritonclient reads).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.responses import Response

from service.api import examples
from service.api.native import (
    ignored,
    json_response,
    mc_metadata,
    off_loop,
    run,
    state,
    to_params,
)
from service.api.schemas import PredictParameters
from service.api.v2_binary import HEADER, decode_input, decode_texts, encode, split
from service.api.v2_outputs import PASSES_USED, PLATFORM, TensorSpec, specs, values
from service.api.v2_schemas import (
    InferRequest,
    InferResponse,
    Live,
    ModelMetadata,
    ModelReady,
    Ready,
    ServerMetadata,
    V2Error,
    inline_schema,
)
from service.encode import sites_used
from service.engine.inputs import check_size
from service.engine.model import Prediction, PredictParams, ServedModel
from service.engine.text import TextBatch, encode_texts
from service.errors import InvalidInputError, ModelNotReadyError

router = APIRouter(prefix="/v2", tags=["open inference protocol"])
# "4XX" also keeps FastAPI from documenting its 422, which /v2 never answers (400 instead).
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": V2Error} for code in (400, 404, 413, 429, 500, 503, 504, "4XX")
}
EXTENSIONS = ["binary_tensor_data"]

Name = Annotated[str, Path(description="model name", openapi_examples=examples.names())]
Version = Annotated[str, Path(description="model version", openapi_examples=examples.VERSIONS)]
HeaderLength = Annotated[
    int | None,
    Header(alias=HEADER, ge=0, description="binary tensor extension: bytes of the JSON header"),
]
INFER_DOC: dict[str, Any] = {
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
    }
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


@router.get("", response_model=ServerMetadata)
async def server_metadata(request: Request) -> Response:
    return json_response(
        {"name": "mcserve", "version": request.app.version, "extensions": EXTENSIONS}
    )


def metadata(model: ServedModel, versions: list[str]) -> dict[str, Any]:
    spec = model.manifest.inputs
    return {
        "name": model.name,
        "versions": versions,
        "platform": PLATFORM,
        "inputs": [
            {"name": spec.name, "datatype": "BYTES", "shape": [-1]}
            if spec.text is not None
            else {"name": spec.name, "datatype": "FP32", "shape": [-1, *spec.shape]}
        ],
        "outputs": [s.metadata() for s in specs(model)],
        # mcserve's own: the dropout-site setting, chosen per request by `dropout_sites`.
        "parameters": mc_metadata(model),
    }


async def metadata_of(request: Request, name: str, version: str | None) -> Response:
    reg = state(request).registry
    model = reg.get(name, version)
    return json_response(metadata(model, [e.version for e in reg.versions(name)]))


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


def parse(header: bytes) -> InferRequest:
    try:
        return InferRequest.model_validate_json(header)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_context=False, include_input=False)
        raise RequestValidationError(errors) from None


def select(
    req: InferRequest, model: ServedModel, mode: str, auto: bool = False
) -> list[tuple[TensorSpec, bool]]:
    """(output, binary?) in response order; refuses unknown outputs before any compute.
    `passes_used` is in a response that names no outputs only for samples=auto."""
    available = specs(model)
    by_name = {s.name: s for s in available}
    binary = bool(req.parameters.binary_data_output)
    if req.outputs is None:
        return [
            (s, binary)
            for s in available
            if (mode == "mc" or s.deterministic) and (auto or s.name != PASSES_USED)
        ]
    chosen: list[tuple[TensorSpec, bool]] = []
    for out in req.outputs:
        spec = by_name.get(out.name)
        if spec is None:
            raise InvalidInputError(
                f"unknown output '{out.name}'; model '{model.name}' has outputs {list(by_name)}"
            )
        if any(s.name == out.name for s, _ in chosen):
            raise InvalidInputError(f"output '{out.name}' is requested twice")
        if mode == "deterministic" and not spec.deterministic:
            only = [s.name for s in available if s.deterministic]
            raise InvalidInputError(
                f"output '{out.name}' needs mode=mc; mode=deterministic (dropout off) answers "
                f"only {only}"
            )
        flag = out.parameters.binary_data if out.parameters else None
        chosen.append((spec, binary if flag is None else flag))
    return chosen


def answer_parameters(model: ServedModel, pred: Prediction, p: PredictParams) -> dict[str, Any]:
    out: dict[str, Any] = {
        "mode": pred.mode,
        "backend": pred.backend,
        "device": pred.device,
        "digest": model.digest,
    }
    if pred.mode == "mc":
        out.update(samples=pred.samples, seed=pred.seed, confidence=p.confidence[0])
        out["interval"] = p.interval
        out["dropout_sites"] = sites_used(pred)
    if pred.warnings:
        out["warnings"] = "; ".join(pred.warnings)
    return out


async def infer_with(
    request: Request, name: str, version: str | None, header_length: int | None
) -> Response:
    st = state(request)
    batcher = st.batcher(name, version)
    model = batcher.model
    spec, limit = model.manifest.inputs, st.settings.max_instances
    raw = await request.body()
    header, binary = split(raw, header_length)
    check_size(header, spec, limit)  # before parsing: bounds what the JSON may cost
    req = await off_loop(lambda: parse(header), nbytes=len(header))
    p = req.parameters
    given = PredictParameters(
        samples=p.samples,
        max_samples=p.max_samples,
        tolerance=p.tolerance,
        confidence=p.confidence,
        seed=p.seed,
        mode=p.mode,
        interval=p.interval,
        dropout_sites=p.dropout_sites,
    )
    params = to_params(given, model, st.settings.max_samples)
    wanted = select(req, model, params.mode, auto=params.auto is not None)
    notes = None
    if spec.text is not None:  # a text model: BYTES in, token ids to the engine
        text, tokenizer = spec.text, model.bundle.tokenizer

        def tokenized() -> TextBatch:
            texts = decode_texts(req.inputs, binary, spec, limit)
            return encode_texts(texts, tokenizer, text, limit)

        batch = await off_loop(tokenized, nbytes=len(raw))
        x = batch.ids
        notes = batch.notes()
    else:
        x = await off_loop(lambda: decode_input(req.inputs, binary, spec, limit), nbytes=len(raw))
    timeout = p.timeout / 1e6 if p.timeout else None
    pred = await run(request, batcher, x, params, timeout, input_notes=notes)
    pred.warnings.extend(ignored(given))
    arrays = values(pred, [s for s, _ in wanted])
    head: dict[str, Any] = {"model_name": model.name, "model_version": model.version}
    if req.id is not None:
        head["id"] = req.id
    head["parameters"] = answer_parameters(model, pred, params)
    if notes is not None:  # per text: tokens before any cut, and whether it was cut
        head["parameters"]["tokens"] = [n["tokens"] for n in notes]
        head["parameters"]["truncated"] = [n["truncated"] for n in notes]
    outputs = [(s.name, s.datatype, a, b) for (s, b), a in zip(wanted, arrays, strict=True)]
    body, tail = encode(head, outputs)
    if not tail:
        return Response(body, media_type="application/json")
    headers = {HEADER: str(len(body))}
    return Response(body + tail, media_type="application/octet-stream", headers=headers)


@router.post(
    "/models/{name}/infer",
    response_model=InferResponse,
    responses=INFER_RESPONSES,
    openapi_extra=INFER_DOC,
)
async def infer(name: Name, request: Request, header_length: HeaderLength = None) -> Response:
    return await infer_with(request, name, None, header_length)


@router.post(
    "/models/{name}/versions/{version}/infer",
    response_model=InferResponse,
    responses=INFER_RESPONSES,
    openapi_extra=INFER_DOC,
)
async def infer_version(
    name: Name, version: Version, request: Request, header_length: HeaderLength = None
) -> Response:
    return await infer_with(request, name, version, header_length)
