"""Model repository routes (Triton's model-control extension): explicit load and unload.

Only when the operator enabled explicit model control, and only with an admin API key (the
key check is in `auth.py`; these routes are refused without one even when keys are off).
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.responses import Response

from service.api.common.auth import allowed_models
from service.api.common.call import json_response
from service.api.common.lifecycle import ModelControl
from service.api.common.schemas import ErrorBody
from service.engine.registry import discover
from service.errors import ForbiddenError, InvalidInputError, ModelNotReadyError
from service.json_body import json_body

router = APIRouter(prefix="/v2/repository", tags=["repository"])
ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorBody} for code in (401, 403, 404, 500)
}


def control(request: Request) -> ModelControl:
    ctl: ModelControl = request.app.state.model_control
    if request.app.state.mcserve.settings.model_control != "explicit":
        raise ForbiddenError(
            "explicit model control is off; start the server with MCSERVE_MODEL_CONTROL=explicit "
            "to load and unload models through the API"
        )
    return ctl


@router.post("/index", responses=ERRORS)
async def index(request: Request) -> Response:
    """The models the key may use, with their failure reasons without server paths, and (as
    Triton's) the versions on disk not loaded, UNAVAILABLE "unloaded": after an unload they
    vanished, and a client could not find what it may load. `{"ready": true}` lists only the
    ready ones."""
    shape = '{"ready": true|false}'
    body = await _body(request, {"ready"}, shape)
    if type(body.get("ready", True)) is not bool:
        raise InvalidInputError(f"invalid request: the body is {shape} or nothing")
    reg = request.app.state.mcserve.registry
    allowed = allowed_models(request.state)
    rows = [
        {
            "name": e.name,
            "version": e.version,
            "state": "READY" if e.ready else "UNAVAILABLE",
            "reason": reg.reason(e) or "",
        }
        for e in reg.entries()
    ]
    loaded = {e.path for e in reg.entries()}
    rows += [
        {"name": name, "version": version or "", "state": "UNAVAILABLE", "reason": "unloaded"}
        for name, version, path in discover(reg.root)
        if path not in loaded
    ]
    return json_response(
        [
            r
            for r in rows
            if (allowed is None or r["name"] in allowed)
            and (not body.get("ready") or r["state"] == "READY")
        ]
    )


async def _body(request: Request, keys: set[str], shape: str) -> dict[str, Any]:
    """The body as a JSON object of `keys` only ({} for none), read whatever its Content-Type:
    tritonclient sends the unload body with none, and FastAPI then read no JSON (every
    unload_model() was a 400). `shape` says what it should be."""
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        body = orjson.loads(json_body(raw))
    except orjson.JSONDecodeError as exc:
        raise InvalidInputError(f"invalid request: body: not JSON ({exc})") from None
    if not isinstance(body, dict) or set(body) - keys:
        raise InvalidInputError(f"invalid request: the body is {shape} or nothing")
    return body


async def _parameters(request: Request) -> dict[str, Any]:
    """The body's `parameters`."""
    params = (await _body(request, {"parameters"}, '{"parameters": {...}}')).get("parameters")
    params = params or {}
    if not isinstance(params, dict):
        raise InvalidInputError("invalid request: parameters must be an object")
    return params


@router.post("/models/{name}/load", responses=ERRORS)
async def load(name: str, request: Request) -> Response:
    params = await _parameters(request)
    given = sorted(params)
    if given:  # Triton's config and file:* overrides; a bundle carries its own
        raise InvalidInputError(
            f"load parameters {given} are not supported: a bundle carries its own configuration "
            "and files; put the version's bundle in the model directory and load by name"
        )
    entries = await control(request).load(name)
    reg = request.app.state.mcserve.registry
    if entries and not any(e.ready for e in reg.versions(name)):
        # A 200 with ready false: tritonclient's load_model reported success (reviewer LC).
        # Triton answers a load that leaves no version ready with an error, so does this.
        why = "; ".join(f"version {e.version}: {reg.reason(e)}" for e in entries)
        raise ModelNotReadyError(f"model '{name}' failed to load, no version is ready: {why}")
    return json_response(
        {
            "name": name,
            "loaded": [
                {"version": e.version, "ready": e.ready, "reason": reg.reason(e)} for e in entries
            ],
        }
    )


class UnloadParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str | None = Field(default=None, description="unload this version only")
    # Triton's: a model's dependents in an ensemble; there are no ensembles here, so none.
    unload_dependents: bool | None = Field(default=None, description="accepted, no ensembles")


# The body the docs show (read by hand above, so that any Content-Type is read as JSON).
UNLOAD_BODY = {
    "type": "object",
    "properties": {"parameters": UnloadParameters.model_json_schema()},
    "additionalProperties": False,
}


@router.post(
    "/models/{name}/unload",
    responses=ERRORS,
    openapi_extra={
        "requestBody": {
            "required": False,
            "content": {"application/json": {"schema": UNLOAD_BODY}},
        }
    },
)
async def unload(name: str, request: Request) -> Response:
    raw = await _parameters(request)
    unknown = sorted(set(raw) - set(UnloadParameters.model_fields))
    if unknown:
        raise InvalidInputError(
            f"unknown unload parameter(s) {unknown}; known: version, unload_dependents"
        )
    try:
        params = UnloadParameters.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise InvalidInputError(f"invalid request: parameters.{where}: {first['msg']}") from None
    count = await control(request).unload(name, params.version)
    return json_response({"name": name, "unloaded_versions": count})
