"""The CDS adapter's state per replica (`Clinical`, built from the settings) and the
authentication of its clients: the JWT checks of `service.clinical.trust`, with the audience
from the configured public URL only and keys fetched from allow-listed `jku` URLs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from fastapi import Request
from prometheus_client import Counter

from service.clinical.catalogue import Catalogue
from service.clinical.jwks import JwksFetcher
from service.clinical.ledger import Ledger
from service.clinical.shared import SharedMemory, SharedUnavailable
from service.clinical.trust import (
    TokenRejected,
    TokenVerifier,
    TrustConfigError,
    bearer,
    load_keys,
)
from service.errors import ReplayCheckUnavailableError, UnauthorizedError
from service.settings import PUBLIC_BASE_URL_REQUIRED, Settings

log = logging.getLogger("mcserve.cds")


@dataclass
class Clinical:
    """What the CDS adapter keeps while the app runs (per replica)."""

    settings: Settings
    catalogue: Catalogue
    verifier: TokenVerifier
    ledger: Ledger
    clock: Callable[[], float] = time.time  # wall clock: JWT times and observation ages
    jwks: JwksFetcher = field(default_factory=JwksFetcher)  # issuers' keys at their jku URLs
    shared: SharedMemory | None = None  # replay and card memory of all replicas (audit_url)
    fhir_transport: httpx.AsyncBaseTransport | None = None  # tests: an in-process FHIR server
    counters: dict[str, Counter] = field(default_factory=dict)

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)


def counters(registry: Any) -> dict[str, Counter]:
    return {
        "cards": Counter(
            "mcserve_cds_cards",
            "CDS cards issued by service and indicator",
            ["service", "indicator"],
            registry=registry,
        ),
        "feedback": Counter(
            "mcserve_cds_feedback",
            "CDS card feedback by service and outcome (accepted, overridden)",
            ["service", "outcome"],
            registry=registry,
        ),
    }


def build(settings: Settings) -> Clinical:
    issuers = {
        # An issuer known by its jku URLs alone has no configured keys.
        iss: []
        if cfg.jku and cfg.jwks is None and cfg.jwks_file is None
        else load_keys(iss, cfg.jwks, cfg.jwks_file)
        for iss, cfg in settings.cds_issuers.items()
    }
    mapping_dir = settings.cds_mapping_dir or Path(settings.model_dir) / "clinical"
    cds = Clinical(
        settings=settings,
        catalogue=Catalogue.load(mapping_dir),
        verifier=TokenVerifier(
            issuers,
            jku={iss: cfg.jku for iss, cfg in settings.cds_issuers.items()},
            leeway_s=settings.cds_jwt_leeway_s,
            max_lifetime_s=settings.cds_jwt_max_lifetime_s,
            replay_capacity=settings.cds_jti_capacity,
        ),
        ledger=Ledger(settings.cds_card_capacity),
    )
    cds.verifier.clock = lambda: cds.clock()  # tests replace cds.clock
    if settings.cds_require_jwt and issuers and settings.public_base_url is None:
        # Settings refuse this already; a settings object built without validation must not
        # start either (the audience would have nothing to come from).
        raise TrustConfigError(PUBLIC_BASE_URL_REQUIRED)
    if settings.audit_url:
        cds.shared = SharedMemory(settings.audit_url)
    if not settings.cds_require_jwt:
        log.warning("CDS Hooks client authentication is OFF (cds_require_jwt=false)")
    elif not issuers:
        log.warning("no CDS issuers are trusted (cds_issuers): every CDS call will answer 401")
    return cds


def audiences(request: Request, settings: Settings, feedback: bool = False) -> list[str]:
    """The `aud` values a token may name: the configured public URL plus the path called.

    Never the request's Host or X-Forwarded-* headers: the client chooses those, so a token
    issued for another service would pass. No public URL: no audience (every token refused).
    """
    if settings.public_base_url is None:
        return []
    url = settings.public_base_url.rstrip("/") + request.url.path
    # Feedback: the feedback URL or the service's own URL (clients differ here).
    return [url, url.removesuffix("/feedback")] if feedback else [url]


async def authenticate(request: Request, cds: Clinical, feedback: bool = False) -> None:
    if not cds.settings.cds_require_jwt:
        return
    token = bearer(request.headers.get("authorization"))
    if token is None:
        log.warning("CDS call refused", extra={"reason": "no bearer token"})
        raise UnauthorizedError("unauthorized")
    allowed = audiences(request, cds.settings, feedback)
    try:
        if not allowed:
            raise TokenRejected("public_base_url is not set: no audience to check against")
        iss, kid, urls = cds.verifier.key_urls(token)
        fetched = [k for url in urls for k in await cds.jwks.keys(iss, url, kid)]
        claims = cds.verifier.verify(token, allowed, fetched)
        if cds.shared is not None:  # seen by another replica?
            try:
                fresh = await cds.shared.first_use(
                    claims.iss, claims.jti, claims.until, cds.clock()
                )
            except SharedUnavailable as exc:  # fail closed, but not as a bad login: a 503
                log.warning("CDS call refused", extra={"reason": f"replay memory: {exc}"})
                raise ReplayCheckUnavailableError(
                    "the token cannot be checked for reuse (the memory replicas share is "
                    "unavailable): retry with a new token (this one is spent); another replica "
                    "may answer",
                    exc.retry_after_s,
                ) from None
            if not fresh:
                raise TokenRejected("jti replayed (seen by another replica)")
    except TokenRejected as exc:
        log.warning("CDS call refused", extra={"reason": str(exc), "path": request.url.path})
        raise UnauthorizedError("unauthorized") from None
    # For the access log: who called (the issuer, never the token).
    request.state.caller = claims.iss
    request.state.cds_claims = claims
