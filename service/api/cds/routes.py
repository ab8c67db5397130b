"""CDS Hooks 2.0 at /cds-services: discovery, service calls and feedback (docs/CLINICAL.md).

A thin adapter: the client's JWT is checked first (`service.clinical.trust`; a bare 401 on any
failure, before the body is even parsed), the prefetch becomes features
(`service.clinical.extraction`), the engine answers through the one engine call of every
adapter (`common.call.run`, with the model's default parameters via
`common.parameters.to_params`), and the prediction becomes a card carrying a FHIR resource.
Errors map to HTTP in `common/errors.py` (400, 404, 412, bare 401, 503; body a FHIR
OperationOutcome); missing data answer an info card unless `cds_missing_data` is "412". API
keys never guard these routes. Discovery is open: it holds no patient data.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, FastAPI, Request
from fastapi import Path as PathParam
from starlette.responses import Response

from service.api.cds.clients import Clinical, authenticate, build, counters
from service.api.common import audit as audit_trail
from service.api.common.call import run, state
from service.api.common.fields import inline_schema
from service.api.common.media import require_json
from service.api.common.parameters import PredictParameters, to_params
from service.clinical import cards as card_builder
from service.clinical import fhir
from service.clinical.extraction import extract
from service.clinical.fetch import FetchPolicy, complete, missing_keys, note
from service.clinical.hooks import ORDER_HOOKS, FeedbackRequest, HookRequest, parse
from service.clinical.ledger import Record
from service.clinical.mapping import Mapping
from service.clinical.orders import wanted
from service.clinical.search import Limits
from service.engine.inputs import to_array
from service.engine.model import ServedModel
from service.errors import DeadlineExceededError, MissingDataError

log = logging.getLogger("mcserve.cds")
audit = logging.getLogger("mcserve.cds.audit")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # Runs after the app's own lifespan has loaded the models (FastAPI nests router lifespans).
    cds = app.state.cds = build(app.state.mcserve.settings)
    metrics = getattr(app.state, "metrics", None)
    if metrics is not None:
        if not hasattr(app.state, "cds_counters"):  # once per registry, however many lifespans
            app.state.cds_counters = counters(metrics.registry)
        cds.counters = app.state.cds_counters
    yield
    if cds.shared is not None:
        await cds.shared.close()


router = APIRouter(prefix="/cds-services", tags=["cds hooks"], lifespan=lifespan)
ServiceId = Annotated[str, PathParam(description="CDS service id (see discovery)")]
CALL_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": inline_schema(HookRequest)}},
    }
}
FEEDBACK_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": inline_schema(FeedbackRequest)}},
    }
}


OUTCOME = {
    "content": {
        "application/fhir+json": {"schema": {"type": "object"}},
        "application/json": {"schema": {"type": "object"}},
    }
}
CDS_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "bad request (FHIR OperationOutcome)", **OUTCOME},
    401: {"description": "the CDS client JWT is missing or refused (no body)"},
    404: {"description": "unknown service or card (FHIR OperationOutcome)", **OUTCOME},
    412: {"description": "needed data missing, too old or in an unknown unit", **OUTCOME},
    500: {"description": "internal error (FHIR OperationOutcome)", **OUTCOME},
    503: {"description": "overloaded or past its deadline (FHIR OperationOutcome)", **OUTCOME},
}


def clinical(request: Request) -> Clinical:
    cds: Clinical = request.app.state.cds
    return cds


def cds_json(payload: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json")


@router.get("", summary="CDS Hooks discovery")
async def discovery(request: Request) -> Response:
    cds = clinical(request)
    return cds_json(cds.catalogue.discovery(state(request).registry))


@router.post(
    "/{service_id}", summary="Call a CDS service", openapi_extra=CALL_DOC, responses=CDS_ERRORS
)
async def call(service_id: ServiceId, request: Request) -> Response:
    cds, st = clinical(request), state(request)
    await authenticate(request, cds)
    require_json(request)  # after authentication: an unauthenticated call learns nothing
    offered = cds.catalogue.find(service_id, st.registry)
    body = parse(HookRequest, await request.body())
    patient_id = body.patient_id(offered.service.hook)
    if offered.service.hook in ORDER_HOOKS and not wanted(offered.service, body.selected()):
        return cds_json({"cards": []})  # none of the orders concerns this model
    now = cds.now()
    model = offered.model
    prefetch, notes = await fetch_missing(request, cds, offered.mapping, body, patient_id)
    try:
        ex = extract(
            offered.mapping,
            patient_id,
            prefetch,
            now,
            cds.settings.cds_max_observation_age_days,
        )
        spec = model.manifest.inputs
        names = spec.feature_names or []
        whole = [spec.value_range] * len(names) if spec.value_range else None
        features = ex.features(names, spec.valid_ranges or whole)
    except MissingDataError as exc:
        exc.details += notes  # why fetching did not help
        if cds.settings.cds_missing_data == "412":
            raise
        return await missing_data_card(cds, service_id, body, model, offered.mapping, exc)
    x = to_array([features], model.manifest.inputs, 1)
    # A hook call cannot send samples: with the model's default over the server's maximum,
    # every call was refused ("send samples"); it runs the maximum (its card says how many).
    most = st.settings.max_samples
    over = model.manifest.defaults.samples > most
    params = to_params(PredictParameters(samples=most if over else None), model, most)
    batcher = st.batcher(model.name, model.version)
    card_id = str(uuid.uuid4())  # known before the answer: the audit record names it
    ms = cds.settings.cds_timeout_ms
    try:
        pred = await run(
            request, batcher, x, params, ms / 1000.0, card_uuid=card_id, from_arrival=False
        )
    except DeadlineExceededError as exc:  # a hook caller cannot set a timeout of its own
        hint = (
            f"the server gives a hook call's compute {ms:g} ms (MCSERVE_CDS_TIMEOUT_MS); retry "
            "later, or ask its operator to raise that setting"
        )
        raise DeadlineExceededError(exc.what, hint) from exc
    ctx = fhir.Context(
        subject=ex.patient,
        when=now,
        basis=ex.basis(),
        encounter=body.encounter(),
        version=cds.settings.fhir_version,
        mapping=offered.mapping,
    )
    resource = fhir.resource(model, pred, 0, ctx)
    issued = card_builder.card(
        offered.mapping, model, pred, 0, ex, resource, card_id, cds.settings.public_base_url,
        page=cds.settings.pages,
    )  # fmt: skip
    card = issued.card
    record = Record(
        card=card["uuid"],
        service=service_id,
        suggestion=issued.suggestion,
        model=model.name,
        version=model.version,
        digest=model.digest,
        hook_instance=body.hookInstance,
        referred=issued.referred,
    )
    await remember(cds, record)
    if cds.counters:
        cds.counters["cards"].labels(service_id, card["indicator"]).inc()
    claims = getattr(request.state, "cds_claims", None)
    audit.info(
        "cds card",
        extra={
            "service": service_id,
            "hook_instance": body.hookInstance,
            "card": card["uuid"],
            "model": model.name,
            "version": model.version,
            "digest": model.digest,
            "samples": pred.samples,
            "seed": pred.seed,
            "referred": issued.referred,
            "iss": claims.iss if claims else None,
            "jti": claims.jti if claims else None,
            "tenant": claims.tenant if claims else None,
        },
    )
    return cds_json({"cards": [card]})


async def fetch_missing(
    request: Request, cds: Clinical, mapping: Mapping, body: HookRequest, patient_id: str
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The prefetch, completed from the issuer's allow-listed FHIR server where it lacks keys."""
    claims = getattr(request.state, "cds_claims", None)
    issuer = cds.settings.cds_issuers.get(claims.iss) if claims else None
    if issuer is None or not issuer.fhir_servers:
        keys = missing_keys(mapping.prefetch(), body.prefetch) if body.fhirServer else []
        why = (
            "not fetched: no FHIR server is allow-listed for this call's issuer (fhir_servers "
            "in MCSERVE_CDS_ISSUERS), so the prefetch must hold it"
            if claims
            else "not fetched: without client authentication no FHIR server is ever asked (a "
            "patient's access token goes only to servers of an authenticated issuer), so the "
            "prefetch must hold it"
        )  # the call named a server: say why it was not asked (it was silent)
        return dict(body.prefetch or {}), [note(k, why, "security") for k in keys]
    s = cds.settings
    limits = Limits(max_bytes=s.cds_fhir_max_bytes, max_pages=s.cds_fhir_max_pages)
    policy = FetchPolicy(issuer.fhir_servers, s.cds_fhir_timeout_s, limits)
    return await complete(
        mapping.prefetch(),
        body.prefetch,
        patient_id,
        body.fhirServer,
        body.fhirAuthorization,
        policy,
        cds.fhir_transport,
    )


async def remember(cds: Clinical, record: Record) -> None:
    """Every card with a uuid, so that its feedback is accepted (CDS Hooks asks for it)."""
    cds.ledger.issue(record)
    if cds.shared is not None:  # feedback may reach another replica
        await cds.shared.issue(record, cds.clock())


async def missing_data_card(
    cds: Clinical,
    service_id: str,
    body: HookRequest,
    model: ServedModel,
    mapping: Mapping,
    exc: MissingDataError,
) -> Response:
    """A 200 with an info card naming what is missing (the clinician sees it; a 412 is not)."""
    card = card_builder.missing(
        mapping, model, exc.details, str(uuid.uuid4()), cds.settings.public_base_url,
        page=cds.settings.pages,
    )  # fmt: skip
    record = Record(
        card=card["uuid"], service=service_id, suggestion="", model=model.name,
        version=model.version, digest=model.digest, hook_instance=body.hookInstance,
        referred=False,
    )  # fmt: skip
    await remember(cds, record)  # its feedback ("overridden": the data was there) counts too
    if cds.counters:
        cds.counters["cards"].labels(service_id, "info").inc()
    audit.info(
        "cds card without prediction",
        extra={
            "service": service_id,
            "hook_instance": body.hookInstance,
            "card": card["uuid"],
            "model": model.name,
            "version": model.version,
            "missing": [i["details"]["text"] for i in exc.details],
        },
    )
    return cds_json({"cards": [card]})


@router.post(
    "/{service_id}/feedback",
    summary="Feedback on a service's cards",
    openapi_extra=FEEDBACK_DOC,
    responses=CDS_ERRORS,
)
async def feedback(service_id: ServiceId, request: Request) -> Response:
    cds = clinical(request)
    await authenticate(request, cds, feedback=True)
    require_json(request)
    cds.catalogue.find(service_id, state(request).registry)  # 404 for an unknown service
    body = parse(FeedbackRequest, await request.body())
    if cds.shared is not None:  # cards another replica issued
        for item in body.feedback:
            if cds.ledger.get(item.card) is None:
                found = await cds.shared.card(item.card)
                if found is not None:
                    cds.ledger.issue(found)
    outcomes = cds.ledger.check(service_id, body.feedback)
    # All recorded or none (503): items queued before a refusal were recorded again by the
    # client's retry. Counted once recorded.
    events = [
        audit_trail.feedback_event(
            request,
            o.card,
            o.outcome,
            i.overrideReason.model_dump(exclude_none=True) if i.overrideReason else None,
            o.timestamp,
            service_id,
        )
        for i, o in zip(body.feedback, outcomes, strict=True)
    ]
    audit_trail.record_all(request, events)
    cds.ledger.count(outcomes)
    for o in outcomes:
        if cds.counters:
            cds.counters["feedback"].labels(service_id, o.outcome).inc()
        audit.info(
            "cds feedback",
            extra={
                "service": o.service,
                "card": o.card,
                "outcome": o.outcome,
                "model": o.model,
                "version": o.version,
                "referred": o.referred,
                "override_reason": o.override_reason,
                "accepted_suggestions": o.accepted_suggestions,
                "outcome_timestamp": o.timestamp,
            },
        )
    return Response(status_code=200)
