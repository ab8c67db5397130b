"""A FHIR server's answers, read: JSON, refusals and their OperationOutcome, validation with
`fhir.resources`, and a searchset's links (`search.py` asks, this reads what came back).

Every failure is a `SearchFailed` whose `code` is the FHIR IssueType that says what would help
(`login`: a new token).
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qsl, urlsplit

Json = dict[str, Any]


class SearchFailed(Exception):
    """Why a read or search gave nothing usable; `code` is a FHIR IssueType."""

    def __init__(self, message: str, code: str = "transient") -> None:
        super().__init__(message)
        self.code = code


# FHIR DSTU2's JSON media type, still listed by R4 (http.html#mime-type) and sent by older EHRs
LEGACY_FHIR_JSON = "application/json+fhir"


def parse(body: bytes, content_type: str) -> Json:
    media = content_type.split(";", 1)[0].strip().lower()
    json_like = media.endswith("/json") or media.endswith("+json") or media == LEGACY_FHIR_JSON
    if media and not json_like:
        raise SearchFailed(f"the answer is {media}, not FHIR JSON", "structure")
    try:
        res = json.loads(body)
    except ValueError:
        raise SearchFailed("the answer is not JSON", "structure") from None
    if not isinstance(res, dict) or not isinstance(res.get("resourceType"), str):
        raise SearchFailed("the answer is not a FHIR resource", "structure")
    return res


def refusal(status: int, res: Json) -> SearchFailed:
    said = diagnostics(res)
    tail = f" (the server said: {said})" if said else ""
    if status == 401:
        return SearchFailed(
            f"HTTP 401: the FHIR server refused the access token (expired or revoked){tail}",
            "login",
        )
    if status == 403:
        return SearchFailed(
            f"HTTP 403: the access token does not allow this read{tail}", "forbidden"
        )
    if status == 200:
        return SearchFailed(f"the server answered an OperationOutcome{tail}", "processing")
    return SearchFailed(f"HTTP {status}{tail}")


def diagnostics(res: Json) -> str:
    """The OperationOutcome's own words, short and printable (they reach a card)."""
    if res.get("resourceType") != "OperationOutcome":
        return ""
    said = []
    issues = res.get("issue")
    for i in issues if isinstance(issues, list) else []:
        if isinstance(i, dict):
            details = i.get("details")  # a server may send a string where FHIR has an object
            found = (
                i.get("diagnostics"),
                details.get("text") if isinstance(details, dict) else None,
                i.get("code"),
            )
            text = next((t for t in found if isinstance(t, str) and t), None)  # the first words
            if text is not None:
                said.append(text)
    joined = "; ".join(dict.fromkeys(said))
    return "".join(c if c.isprintable() else " " for c in joined)[:200]


def validate(res: Json, name: str) -> None:
    from fhir.resources import get_fhir_model_class as r5
    from fhir.resources.R4B import get_fhir_model_class as r4b

    first = None
    for get in (r4b, r5):
        try:
            get(str(res.get("resourceType"))).model_validate(res)
            return
        except (KeyError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
            first = first or exc
    errors = getattr(first, "errors", None)
    if callable(errors):
        e = errors(include_input=False)[0]
        why = f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
    else:
        why = f"unknown resource type {res.get('resourceType')!r}"
    raise SearchFailed(f"{name} is not valid FHIR (R4B or R5): {why}", "structure")


def used(bundle: Json, name: str) -> bool:
    """Whether the server says it used search parameter `name`: a searchset's `self` link lists
    the parameters it used (FHIR R4 3.1.1.3.1.1; HAPI drops what it ignored). A self link
    without a query says nothing, and is taken at its word that nothing was dropped."""
    for link in bundle.get("link") or []:
        if isinstance(link, dict) and link.get("relation") == "self":
            url = link.get("url")
            if isinstance(url, str) and "?" in url:
                return name in dict(parse_qsl(urlsplit(url).query))
    return True


def next_link(bundle: Json) -> str | None:
    for link in bundle.get("link") or []:
        if isinstance(link, dict) and link.get("relation") == "next":
            url = link.get("url")
            return url if isinstance(url, str) and url else None
    return None


def name_of(res: Any) -> str:
    if not isinstance(res, dict):
        return "not a resource"
    kind, rid = res.get("resourceType"), res.get("id")
    return f"{kind}/{rid}" if rid else f"a {kind}"
