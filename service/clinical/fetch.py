"""Fetch what the EHR did not prefetch from its FHIR server (CDS Hooks `fhirServer`).

Only where it is safe and allowed, else nothing is fetched and the reason is noted:
- the call's `fhirServer` is on its issuer's allow-list (`CdsIssuer.fhir_servers`: the service
  sends a patient's access token only to servers the deployer named, never to any URL a
  request carries);
- `fhirAuthorization` is a Bearer token whose `scope` grants reading what is fetched
  (`patient/`, `user/` or `system/` with `.read`, `.rs` or `.*` for Patient and Observation)
  and whose `patient`, when given, is the call's patient;
- each search is a discovery prefetch template (the only queries ever sent), with the token,
  redirects never followed, a deadline for all of them together, and at most `max_bytes` read
  per answer, which must be a FHIR searchset Bundle (or the Patient).
A failure (an expired token answered 401, a slow server, a Bundle over the limit) leaves the key
missing: the card then names the missing inputs and the note says why fetching did not help.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

Json = dict[str, Any]
SCOPE = re.compile(r"^(patient|user|system)/(\*|[A-Za-z]+)\.(read|rs|\*|r)$")


@dataclass(frozen=True)
class FetchPolicy:
    servers: Sequence[str]  # allow-listed base URLs of the issuer's FHIR servers
    timeout_s: float = 3.0  # for all of one call's searches together
    max_bytes: int = 2 * 1024 * 1024  # per answer


def note(key: str, diagnostics: str, code: str = "transient") -> Json:
    """An OperationOutcome issue saying why a prefetch key could not be fetched either."""
    return {
        "severity": "warning",
        "code": code,
        "details": {"text": f"prefetch '{key}'"},
        "diagnostics": diagnostics,
    }


def _allowed(server: str, servers: Sequence[str]) -> bool:
    base = server.rstrip("/")
    return any(base == s.rstrip("/") for s in servers)


def _grants(scope: str, resource: str) -> bool:
    for s in scope.split():
        m = SCOPE.match(s)
        if m and m.group(2) in ("*", resource):
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
    granted = str(auth.get("scope", ""))
    if auth.get("patient") not in (None, patient_id):
        why = "not fetched: fhirAuthorization is for another patient"
        return out, [note(k, why, "security") for k in keys]
    queries: dict[str, str] = {}
    notes = []
    for k in keys:
        query = templates[k].replace("{{context.patientId}}", patient_id)
        resource = query.split("?", 1)[0].split("/", 1)[0]
        if _grants(granted, resource):
            queries[k] = query
        else:
            why = f"not fetched: the access token's scope does not grant reading {resource}"
            notes.append(note(k, why, "security"))
    if not queries:
        return out, notes
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/fhir+json"}
    async with httpx.AsyncClient(
        base_url=fhir_server.rstrip("/") + "/",
        headers=headers,
        follow_redirects=False,
        timeout=2 * policy.timeout_s,  # a backstop: the one deadline below is what counts
        transport=transport,
    ) as client:
        tasks = {
            k: asyncio.ensure_future(_get(client, q, policy.max_bytes)) for k, q in queries.items()
        }
        _, pending = await asyncio.wait(tasks.values(), timeout=policy.timeout_s)
        for t in pending:
            t.cancel()
        for k, t in tasks.items():
            if t in pending:
                notes.append(note(k, f"fetching it timed out after {policy.timeout_s:g} s"))
                continue
            exc = t.exception()
            if exc is not None:
                notes.append(note(k, f"fetching it failed: {exc}"))
            else:
                out[k] = t.result()
    return out, notes


class FetchFailed(Exception):
    pass


async def _get(client: httpx.AsyncClient, query: str, max_bytes: int) -> Json:
    body = bytearray()
    try:
        async with client.stream("GET", query) as r:
            if r.status_code in (401, 403):
                raise FetchFailed(f"HTTP {r.status_code}: the access token was refused or expired")
            if r.status_code != 200:
                raise FetchFailed(f"HTTP {r.status_code} (redirects are not followed)")
            async for chunk in r.aiter_bytes():
                body += chunk
                if len(body) > max_bytes:
                    raise FetchFailed(f"the answer is over {max_bytes} bytes")
    except httpx.HTTPError as exc:
        raise FetchFailed(type(exc).__name__) from None
    try:
        res = json.loads(body)
    except ValueError:
        raise FetchFailed("the answer is not JSON") from None
    kind = res.get("resourceType") if isinstance(res, dict) else None
    if kind not in ("Bundle", "Patient"):
        raise FetchFailed(f"the answer is a {kind!r}, not a Bundle or Patient")
    return res
