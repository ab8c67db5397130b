"""The native prediction: a `PredictRequest` to the engine call and back to JSON (or FHIR)."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import orjson
from fastapi import Request
from starlette.responses import Response

from service.api.common.call import off_loop, run, state
from service.api.common.parameters import ignored, to_params
from service.api.encode import response_json
from service.api.native.schemas import PredictRequest
from service.clinical import fhir
from service.engine.inputs import to_array
from service.engine.model import Prediction, ServedModel
from service.engine.text import encode_texts
from service.errors import InvalidInputError

FHIR_JSON = "application/fhir+json"


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
