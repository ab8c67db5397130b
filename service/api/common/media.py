"""Which request bodies a JSON route reads: by their declared Content-Type.

FastAPI's own test for a JSON body (no type, application/json, or application/*+json); any
other declared type is a 415 naming it. A CDS Hooks call labelled application/xml or a form
was answered as if it were JSON: a client that mislabels its body is told, not guessed at.
"""

from __future__ import annotations

from starlette.requests import Request

from service.clinical.answers import LEGACY_FHIR_JSON
from service.errors import UnsupportedMediaTypeError


def is_json(content_type: str | None) -> bool:
    """No type, application/json, application/*+json or DSTU2's application/json+fhir (text/json
    is not)."""
    if not content_type:
        return True
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind in ("application/json", LEGACY_FHIR_JSON) or (
        kind.startswith("application/") and kind.endswith("+json")
    )


def require_json(request: Request) -> None:
    """Raise a 415 unless the request's body is declared JSON (or not declared at all)."""
    content_type = request.headers.get("content-type")
    if not is_json(content_type):
        raise UnsupportedMediaTypeError(
            f"Content-Type {content_type!r} is not read here; send the body as JSON with "
            "Content-Type: application/json"
        )
