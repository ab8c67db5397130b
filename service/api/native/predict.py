"""The native prediction, `POST /v1/models/{name}[/versions/{v}]:predict`: the one reader of
its request (query, content type, body) and the way to the engine and back to JSON (or FHIR).

Both ways in run exactly this: the front door's dispatch (`service/api/front.py`) and FastAPI's
route, which only documents it (`native/routes.py`).
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Annotated

import orjson
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import StringConstraints, ValidationError
from starlette.responses import Response

from service.api.common.call import featurise, featurise_with_room, off_loop, run, state
from service.api.common.fields import Param
from service.api.common.media import require_json
from service.api.common.parameters import ignored, to_params
from service.api.native.schemas import PredictRequest
from service.clinical import fhir
from service.encode import response_json
from service.engine.clips import audio_batch, checked_clips, clips_of
from service.engine.inputs import check_size, to_array
from service.engine.model import Prediction, ServedModel
from service.engine.text import checked_texts, encode_texts
from service.errors import InvalidInputError, shown_name
from service.json_body import json_body

FHIR_JSON = "application/fhir+json"
SUBJECT_PATTERN = r"^(Patient|Group)/[A-Za-z0-9\-.]{1,64}$"
SUBJECT = Param(
    "query",
    "subject",
    Annotated[str, StringConstraints(pattern=SUBJECT_PATTERN)],
    "with 'Accept: application/fhir+json': the FHIR subject, e.g. Patient/123; the answer is "
    "then a RiskAssessment (classifier) or Observation (regressor)",
)


def wants_fhir(accept: str) -> bool:
    """Whether an Accept header asks for FHIR JSON over plain JSON (RFC 9110: each type takes
    the q of the most specific range that matches it; q outside [0, 1] or not a number is 0).
    FHIR only when named, and a tie goes to it: `application/fhir+json;q=0` refuses it, which
    the substring test read as a request."""
    ranges: dict[str, float] = {}
    for item in accept.split(","):
        kind, *params = (part.strip() for part in item.split(";"))
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
                q = q if 0.0 <= q <= 1.0 else 0.0  # nan and inf fail both comparisons
        kind = kind.lower()
        ranges[kind] = max(q, ranges.get(kind, 0.0))

    def q_of(media: str) -> float | None:
        for r in (media, media.split("/")[0] + "/*", "*/*"):  # most specific first
            if r in ranges:
                return ranges[r]
        return None

    fhir = ranges.get(FHIR_JSON)
    plain = q_of("application/json") or 0.0
    return fhir is not None and fhir > 0.0 and fhir >= plain


def parse(body: bytes) -> PredictRequest:
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInputError(
            "invalid request: body: cannot be parsed; send JSON in UTF-8"
        ) from None
    try:
        return PredictRequest.model_validate_json(json_body(body))
    except ValidationError as exc:
        raise RequestValidationError(
            [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
        ) from None


async def read(request: Request, name: str, version: str | None) -> PredictRequest:
    """The body, checked against the model's input size before it is parsed (a 5 MB body of a
    million instances would hold the loop for 0.6 s)."""
    require_json(request)
    st = state(request)
    st.batcher(name, version)  # an unknown model is a 404 before its body is read (as /v2)
    body = await request.body()
    # Resolved again once the body is in: a version retired meanwhile (an unload, a poll).
    check_size(body, st.batcher(name, version).model.manifest.inputs, st.settings.max_instances)
    return await off_loop(lambda: parse(body), nbytes=len(body))


async def predict_with(request: Request, name: str, version: str | None) -> Response:
    subject = SUBJECT.read(request)
    unknown = sorted(set(request.query_params) - {"subject"})
    if unknown:  # `?samples=5` ran the default passes: a typo never silently falls back
        raise InvalidInputError(
            f"unknown query parameter {shown_name(unknown[0])!r}: the only one is subject (with "
            f"Accept: {FHIR_JSON}); parameters go in the body's 'parameters' object"
        )
    body = await read(request, name, version)
    st = state(request)
    batcher = st.batcher(name, version)
    model = batcher.model
    as_fhir = wants_fhir(request.headers.get("accept", ""))
    if as_fhir and subject is None:
        raise InvalidInputError(
            f"Accept: {FHIR_JSON} needs the query parameter subject (e.g. ?subject=Patient/123)"
        )
    if subject is not None and not as_fhir:
        raise InvalidInputError(
            f"the query parameter subject is read only with Accept: {FHIR_JSON} (the answer "
            "is then a FHIR resource); send that header, or leave subject out"
        )
    params = to_params(body.parameters, model, st.settings.max_samples)
    spec, limit = model.manifest.inputs, st.settings.max_instances
    values = len(body.instances) * math.prod(spec.shape)
    # By the body's bytes too: 9 texts of 100 kB were under the values bound and held the
    # event loop 4.5 s while they were tokenized.
    size = len(await request.body())  # read already: starlette keeps it
    notes = None
    per = math.prod(spec.shape)
    if spec.text is not None:  # text models: strings (or {"text": ...}) to token ids
        text, tokenizer = spec.text, model.bundle.tokenizer
        batch = await featurise_with_room(
            request,
            batcher,
            params,
            "text",
            lambda: checked_texts(body.instances, text, limit),
            lambda texts: encode_texts(texts, tokenizer, text, limit),
            size,
            per,
        )
        x = batch.ids
        notes = batch.notes()
    elif spec.audio is not None:  # audio models: WAV files ({"b64": ...}) to log-mel features
        most = st.settings.max_body_bytes
        audio = await featurise_with_room(
            request,
            batcher,
            params,
            "audio",
            lambda: checked_clips(clips_of(body.instances, limit), spec, limit, "instance", most),
            lambda clips: audio_batch(clips, spec, limit, body_bytes=most),
            size,
            per,
        )
        x = audio.x
        notes = audio.notes()
    else:
        x = await featurise(
            request, name, "numbers", lambda: to_array(body.instances, spec, limit), values=values
        )
    timeout = body.parameters.timeout_ms
    # The audit record keeps the native JSON of these numbers; it says that the client got
    # them as FHIR, and for which subject (its params.representation: docs/AUDIT.md).
    form = (
        {"media_type": FHIR_JSON, "fhir_version": st.settings.fhir_version, "subject": subject}
        if as_fhir and subject is not None
        else None
    )
    pred = await run(
        request,
        batcher,
        x,
        params,
        timeout / 1000.0 if timeout is not None else None,
        input_notes=notes,
        warnings=ignored(body.parameters),  # in the answer the audit record encodes, too
        representation=form,
    )
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
