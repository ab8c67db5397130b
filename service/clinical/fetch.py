"""Fetch what the EHR did not prefetch from its FHIR server (CDS Hooks `fhirServer`).

Only where it is safe and allowed, else nothing is fetched and the reason is noted:
- the call's `fhirServer` is on its issuer's allow-list (`CdsIssuer.fhir_servers`: the service
  sends a patient's access token only to servers the deployer named, never to any URL a
  request carries);
- `fhirAuthorization` is a Bearer token whose `scope` grants reading what is fetched
  (`patient/`, `user/` or `system/` with `.read`, `.rs`, `.r` or `.*` for Patient and
  Observation) and whose `patient`, when given, is the call's patient;
- each query is a discovery prefetch template (the only queries ever sent), run by the FHIR
  search client of `search.py` (same server only, no redirects, bounded bytes, pages and
  entries, resources validated), all of a call's queries under one deadline.
A failure (an expired token answered 401, a slow server, a Bundle over the limit, a redirect or
`next` link to another host, an invalid resource) leaves the key missing: the card then names
the missing inputs and a note per key says why fetching did not help and what would.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from service.clinical.records import FHIR_ID
from service.clinical.search import FhirSearch, Limits, SearchFailed

Json = dict[str, Any]
log = logging.getLogger("mcserve.cds")
# SMART scopes: v1 `patient/Observation.read` (or `.*`), v2 `patient/Observation.rs` whose
# letters are an ordered subset of c, r, u, d, s (`.cruds`); v2 needs `r` to read a resource and
# `s` to search. One narrowed by a query (US Core's `.rs?category=...|laboratory`) grants it too:
# the server applies the narrowing, and what it leaves out is reported missing.
SCOPE = re.compile(r"^(patient|user|system)/(\*|[A-Za-z]+)\.(read|\*|c?r?u?d?s?)(\?\S+)?$")
# RFC 6750 section 2.1's b64token: all a Bearer token may hold. Anything else (a newline, a
# non-ASCII letter) cannot go into a header: httpx refused it with a message quoting the header,
# token included, which reached the card, or raised UnicodeEncodeError (a 500).
B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
# FHIR's id: what may be put into a query for `{{context.patientId}}` (no `&`, `#`, spaces).


@dataclass(frozen=True)
class FetchPolicy:
    servers: Sequence[str]  # allow-listed base URLs of the issuer's FHIR servers
    timeout_s: float = 3.0  # for all of one call's searches together, pages included
    limits: Limits = field(default_factory=Limits)  # bytes per answer, pages, entries per search


def note(key: str, diagnostics: str, code: str = "transient") -> Json:
    """An OperationOutcome issue saying why a prefetch key could not be fetched either."""
    return {
        "severity": "warning",
        "code": code,
        "details": {"text": f"prefetch '{key}'"},
        "diagnostics": f"prefetch '{key}': {diagnostics}",  # a card shows the diagnostics only
    }


def _allowed(server: str, servers: Sequence[str]) -> bool:
    base = server.rstrip("/")
    return any(base == s.rstrip("/") for s in servers)


def _grants(scope: str, resource: str, search: bool) -> bool:
    """Whether `scope` lets us read `resource` (a read of one, or a search when `search`)."""
    for s in scope.split():
        m = SCOPE.match(s)
        if not m or m.group(2) not in ("*", resource):
            continue
        perm = m.group(3)
        if perm in ("read", "*") or ("s" if search else "r") in perm:
            return True
    return False


def missing_keys(templates: Mapping[str, str], prefetch: Mapping[str, Any] | None) -> list[str]:
    """Template keys the client sent nothing usable for (absent, null, or an OperationOutcome)."""
    out = []
    for key in templates:
        value = (prefetch or {}).get(key)
        if not isinstance(value, dict) or value.get("resourceType") == "OperationOutcome":
            out.append(key)
    return out


async def complete(
    templates: Mapping[str, str],
    prefetch: Mapping[str, Any] | None,
    patient_id: str,
    fhir_server: str | None,
    authorization: Mapping[str, Any] | None,
    policy: FetchPolicy,
    transport: httpx.AsyncBaseTransport | None = None,
) -> tuple[dict[str, Any], list[Json]]:
    """The prefetch with the missing keys fetched where possible, and notes on those not."""
    out = dict(prefetch or {})
    keys = missing_keys(templates, prefetch)
    if not keys or fhir_server is None:
        return out, []
    if not _allowed(fhir_server, policy.servers):
        why = "not fetched: the call's fhirServer is not on its issuer's fhir_servers list"
        return out, [note(k, why, "security") for k in keys]
    auth = authorization or {}
    token, kind = auth.get("access_token"), str(auth.get("token_type", ""))
    if not isinstance(token, str) or not token or kind.lower() != "bearer":
        why = "not fetched: fhirAuthorization carries no Bearer access token"
        return out, [note(k, why, "security") for k in keys]
    if not B64TOKEN.fullmatch(token):  # never quoted: it is a secret, even when malformed
        why = (
            "not fetched: fhirAuthorization.access_token is not a Bearer token (RFC 6750 allows "
            "letters, digits, '-', '.', '_', '~', '+', '/' and trailing '='); send the token "
            "as the authorization server issued it"
        )
        return out, [note(k, why, "security") for k in keys]
    if not FHIR_ID.fullmatch(patient_id):
        why = (
            f"not fetched: context.patientId {patient_id[:64]!r} is not a FHIR id (1-64 of "
            "A-Z, a-z, 0-9, '-', '.'), so it cannot be put into a query"
        )
        return out, [note(k, why, "value") for k in keys]
    granted = str(auth.get("scope", ""))
    if auth.get("patient") not in (None, patient_id):
        why = "not fetched: fhirAuthorization is for another patient"
        return out, [note(k, why, "security") for k in keys]
    queries: dict[str, str] = {}
    notes = []
    for k in keys:
        query = templates[k].replace("{{context.patientId}}", patient_id)
        resource = query.split("?", 1)[0].split("/", 1)[0]
        search = "?" in query
        if _grants(granted, resource, search):
            queries[k] = query
        else:
            what = f"searching {resource} (SMART v2: 's')" if search else f"reading {resource}"
            why = f"not fetched: the access token's scope does not grant {what}"
            notes.append(note(k, why, "security"))
    if not queries:
        return out, notes
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/fhir+json"}
    async with httpx.AsyncClient(
        headers=headers,
        follow_redirects=False,  # search.py refuses them: the token stays on this server
        timeout=2 * policy.timeout_s,  # a backstop: the one deadline below is what counts
        transport=transport,
    ) as client:
        server = FhirSearch(client, fhir_server, patient_id, policy.limits)
        tasks = {k: asyncio.ensure_future(server.run(q)) for k, q in queries.items()}
        _, pending = await asyncio.wait(tasks.values(), timeout=policy.timeout_s)
        for t in pending:
            t.cancel()
        for k, t in tasks.items():
            if t in pending:
                notes.append(
                    note(k, f"fetching it timed out after {policy.timeout_s:g} s", "timeout")
                )
                continue
            exc = t.exception()
            if isinstance(exc, SearchFailed):
                notes.append(note(k, f"fetching it failed: {exc}", exc.code))
            elif exc is not None:  # a bug of ours: logged, and the call still gets its card
                log.error("fetching prefetch %r failed", k, exc_info=exc)
                notes.append(note(k, f"fetching it failed: {type(exc).__name__}"))
            else:
                out[k] = t.result()
    return out, notes
