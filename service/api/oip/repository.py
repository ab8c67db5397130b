"""Model repository routes (Triton's model-control extension): explicit load and unload.

Only when the operator enabled explicit model control, and only with an admin API key (the
key check is in `auth.py`; these routes are refused without one even when keys are off).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from service.api.common.auth import allowed_models
from service.api.common.call import json_response
from service.api.common.lifecycle import ModelControl
from service.api.common.schemas import ErrorBody
from service.errors import ForbiddenError, InvalidInputError

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
    """The models the key may use, with their failure reasons without server paths."""
    reg = request.app.state.mcserve.registry
    allowed = allowed_models(request.state)
    return json_response(
        [
            {
                "name": e.name,
                "version": e.version,
                "state": "READY" if e.ready else "UNAVAILABLE",
                "reason": reg.reason(e) or "",
            }
            for e in reg.entries()
            if allowed is None or e.name in allowed
        ]
    )


@router.post("/models/{name}/load", responses=ERRORS)
async def load(name: str, request: Request) -> Response:
    entries = await control(request).load(name)
    reg = request.app.state.mcserve.registry
    return json_response(
        {
            "name": name,
            "loaded": [
                {"version": e.version, "ready": e.ready, "reason": reg.reason(e)} for e in entries
            ],
        }
    )


class UnloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    parameters: dict[str, str] = Field(
        default_factory=dict, description="optional {'version': 'v'}: unload one version only"
    )


@router.post("/models/{name}/unload", responses=ERRORS)
async def unload(name: str, request: Request, body: UnloadRequest | None = None) -> Response:
    params = body.parameters if body else {}
    unknown = sorted(set(params) - {"version"})
    if unknown:
        raise InvalidInputError(f"unknown unload parameter(s) {unknown}; only 'version' is known")
    count = await control(request).unload(name, params.get("version"))
    return json_response({"name": name, "unloaded_versions": count})
