"""The audit trail's side of the HTTP adapters: start and stop the writer with the app, and the
two calls the adapters make (`record` from `common.call.run`, `record_all` of feedback events from
CDS Hooks).

The writer lives at `app.state.audit` (None when auditing is off). Both calls raise
`AuditUnavailableError` (503) when the record cannot be queued and auditing fails closed.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
from fastapi import FastAPI, Request

from service.audit.metrics import AuditCollector
from service.audit.record import FeedbackEvent, PredictionEvent
from service.audit.writer import AuditWriter
from service.engine.model import Prediction, ServedModel
from service.engine.params import PredictParams
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger("mcserve.audit")


def writer_for(settings: Settings) -> AuditWriter:
    key = settings.audit_hmac_key.get_secret_value().encode() if settings.audit_hmac_key else None
    url, path = settings.audit_url, settings.audit_path
    return AuditWriter(
        url,
        path,
        inputs=settings.audit_inputs,
        hmac_key=key,
        queue_size=settings.audit_queue_size,
        batch_size=settings.audit_batch_size,
        queue_bytes=settings.audit_queue_bytes,
        fail_open=settings.audit_fail_open,
        flush_timeout_s=settings.audit_flush_timeout_s,
    )


async def start(app: FastAPI, settings: Settings, metrics: Metrics | None = None) -> None:
    """Open the store before any model loads: a server that cannot audit does not start."""
    app.state.audit = None
    if not settings.audit:
        log.warning("audit trail off: predictions are not recorded (MCSERVE_AUDIT=true)")
        return
    writer = writer_for(settings)
    await writer.start()
    if metrics is not None:
        collector = AuditCollector(writer)
        metrics.registry.register(collector)
        app.state.audit_metrics = (metrics, collector)
    log.info(
        "audit trail on",
        extra={
            "store": writer.description,
            "inputs": settings.audit_inputs,
            "fail_open": settings.audit_fail_open,
        },
    )
    app.state.audit = writer
    st = getattr(app.state, "mcserve", None)
    if st is not None:  # unready while records cannot be written (a load balancer moves on)
        st.checks.append(writer.not_ready_reason)


async def stop(app: FastAPI) -> None:
    """After the batchers drained: every answered prediction is queued; write them all out."""
    writer: AuditWriter | None = getattr(app.state, "audit", None)
    if writer is None:
        return
    await writer.stop()
    registered = getattr(app.state, "audit_metrics", None)
    if registered is not None:
        metrics, collector = registered
        metrics.registry.unregister(collector)
        app.state.audit_metrics = None


def _writer(request: Request) -> AuditWriter | None:
    return getattr(request.app.state, "audit", None)


def _route(request: Request) -> str:
    route = request.scope.get("route")
    return getattr(route, "path", None) or request.url.path


def record(
    request: Request,
    model: ServedModel,
    x: np.ndarray,
    params: PredictParams,
    pred: Prediction,
    card_uuid: str | None = None,
    warnings: list[str] | None = None,
    representation: dict[str, str] | None = None,
) -> None:
    """Queue the record of one prediction before its answer is sent (cheap: references only).
    `warnings`: those of the answer's that the adapter added (a replay adds them again);
    `representation`: the form the client gets it in, when not the native JSON."""
    writer = _writer(request)
    if writer is None:
        return
    state = request.state
    writer.submit(
        PredictionEvent(
            at=time.time(),
            request_id=getattr(state, "request_id", None),
            route=_route(request),
            caller=getattr(state, "caller", None),
            model=model,
            x=x,
            params=params,
            prediction=pred,
            card_uuid=card_uuid,
            adapter_warnings=warnings or None,
            representation=representation,
        )
    )


def feedback_event(
    request: Request,
    card_uuid: str,
    outcome: str,
    override_reason: Any = None,
    outcome_timestamp: str | None = None,
    service_id: str | None = None,
) -> FeedbackEvent:
    """A clinician's accept/override of a CDS card, for `record_all`; linked to the prediction
    whose record carries the same `card_uuid`. The caller is `request.state.caller` (the CDS
    client's iss)."""
    state = request.state
    return FeedbackEvent(
        at=time.time(),
        card_uuid=card_uuid,
        outcome=outcome,
        override_reason=override_reason,
        outcome_timestamp=outcome_timestamp,
        service_id=service_id,
        request_id=getattr(state, "request_id", None),
        caller=getattr(state, "caller", None),
    )


def record_all(request: Request, events: list[FeedbackEvent]) -> None:
    """Record all of one call's feedback or none (503: AuditUnavailableError)."""
    writer = _writer(request)
    if writer is not None:
        writer.submit_all(events)
