"""Inference in the Open Inference Protocol, `POST /v2/models/{name}[/versions/{v}]/infer`: the
one reader of its request (the binary extension's header, the JSON header and the binary tensors
after it), the engine call and the outputs.

Both ways in run exactly this: the front door's dispatch (`service/api/front.py`) and FastAPI's
route, which only documents it (`oip/routes.py`).
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import Field, ValidationError
from starlette.responses import Response

from service.api.common.call import featurise, featurise_with_room, off_loop, run, state
from service.api.common.fields import Param
from service.api.common.parameters import PredictParameters, ignored, to_params
from service.api.oip.binary import HEADER, decode_input, encode, split
from service.api.oip.bytes_input import decode_texts, elements
from service.api.oip.outputs import PASSES_USED, TensorSpec, specs, values
from service.api.oip.schemas import InferParameters, InferRequest
from service.encode import sites_used, warnings_of
from service.engine.clips import audio_batch, checked_clips
from service.engine.inputs import check_size
from service.engine.model import Prediction, ServedModel
from service.engine.params import PredictParams
from service.engine.text import checked_texts, encode_texts
from service.errors import InvalidInputError, shown_name
from service.json_body import json_body

HEADER_LENGTH = Param(
    "header",
    HEADER,
    Annotated[int, Field(ge=0)],
    "binary tensor extension: bytes of the JSON header",
)

# The request parameters /v2 shares with /v1, by name: already validated by InferParameters,
# so a parameter added to both models reaches the engine without a line here.
_SHARED = sorted(PredictParameters.model_fields.keys() & InferParameters.model_fields.keys())


def parse(header: bytes) -> InferRequest:
    try:
        return InferRequest.model_validate_json(json_body(header))
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
                f"unknown output '{shown_name(out.name)}'; model '{model.name}' has outputs "
                f"{list(by_name)}"
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
    warnings = warnings_of(pred)  # as /v1's (the deterministic note was missing here)
    if warnings:
        out["warnings"] = "; ".join(warnings)
    return out


async def infer_with(request: Request, name: str, version: str | None) -> Response:
    header_length = HEADER_LENGTH.read(request)
    if request.query_params:  # `?samples=5` ran the default passes: as on /v1, never silently
        name_given = shown_name(sorted(request.query_params)[0])
        raise InvalidInputError(
            f"unknown query parameter {name_given!r}: inference takes none; parameters go in "
            "the body's 'parameters' object"
        )
    st = state(request)
    st.batcher(name, version)  # an unknown model is a 404 before its body is read
    raw = await request.body()
    # Resolved once the body is in, as /v1 does: a version retired meanwhile (an unload, a
    # poll) answered 503 "shutting down" to a request the next version could serve.
    batcher = st.batcher(name, version)
    model = batcher.model
    spec, limit = model.manifest.inputs, st.settings.max_instances
    header, binary = split(raw, header_length)
    check_size(header, spec, limit)  # before parsing: bounds what the JSON may cost
    req = await off_loop(lambda: parse(header), nbytes=len(header))
    p = req.parameters
    given = PredictParameters.model_construct(**{k: getattr(p, k) for k in _SHARED})
    params = to_params(given, model, st.settings.max_samples)
    wanted = select(req, model, params.mode, auto=params.auto is not None)
    notes = None
    item, per = f"input '{spec.name}', element", math.prod(spec.shape)
    if spec.text is not None:  # a text model: BYTES in, token ids to the engine
        text, tokenizer = spec.text, model.bundle.tokenizer
        batch = await featurise_with_room(
            request,
            batcher,
            params,
            "text",
            lambda: checked_texts(decode_texts(req.inputs, binary, spec, limit), text, limit, item),
            lambda texts: encode_texts(texts, tokenizer, text, limit, item),
            len(raw),
            per,
        )
        x = batch.ids
        notes = batch.notes()
    elif spec.audio is not None:  # an audio model: BYTES of WAV files in, features out
        most = st.settings.max_body_bytes
        # Off the loop by the clips' padded features too: 1,024 tiny WAV files are a 51 kB
        # body, each featurised at the model's full length (1.7 s for a 10 s model).
        audio = await featurise_with_room(
            request,
            batcher,
            params,
            "audio",
            lambda: checked_clips(
                elements(req.inputs, binary, spec, limit, "clips"), spec, limit, item, most
            ),
            lambda clips: audio_batch(clips, spec, limit, item, most),
            len(raw),
            per,
        )
        x = audio.x
        notes = audio.notes()
    else:
        x = await featurise(
            request,
            name,
            "numbers",
            lambda: decode_input(req.inputs, binary, spec, limit),
            nbytes=len(raw),
        )
    timeout = p.timeout / 1e6 if p.timeout is not None else None
    # Its warnings go in before the answer is recorded: the record is the answer sent.
    pred = await run(
        request, batcher, x, params, timeout, input_notes=notes, warnings=ignored(given)
    )
    arrays = values(pred, [s for s, _ in wanted])
    head: dict[str, Any] = {"model_name": model.name, "model_version": model.version}
    if req.id is not None:
        head["id"] = req.id
    head["parameters"] = answer_parameters(model, pred, params)
    outputs = [(s.name, s.datatype, a, b) for (s, b), a in zip(wanted, arrays, strict=True)]
    body, tail = encode(head, outputs)
    if not tail:
        return Response(body, media_type="application/json")
    headers = {HEADER: str(len(body))}
    return Response(body + tail, media_type="application/octet-stream", headers=headers)
