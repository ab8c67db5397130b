"""HTML rendering shared by the model pages and the API documentation: one Jinja2 environment
with autoescaping on for every template, and the Content-Security-Policy they are served under.

Every string a page shows may come from a bundle (a manifest is data from a file): templates
never mark such text safe, and pages carry no inline script, so an escaped `<script>` stays text
and one that slipped through would not run.
"""

from __future__ import annotations

import math
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup
from starlette.responses import HTMLResponse

# Scripts, styles, images and fetches from this server only; no inline script or style, no
# plugins, no framing, no form posts elsewhere. 'self' is the origin the page was loaded from.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
# Swagger UI draws icons from data: URIs; ReDoc inserts <style> elements (styled-components)
# and renders in a blob: worker. Scripts stay 'self' only.
DOCS_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; worker-src 'self' blob:; form-action 'self'; "
    "base-uri 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",  # a page shows what is loaded now
}

# The longest string a page shows whole. Manifest and report strings have no length limit: a
# 100 kB word made pages 1.6 million pixels wide and took Chromium 12-73 s to lay out (the
# bundled models' longest, an intended use, is 688 characters).
MAX_SHOWN = 2000


def _clip(value: Any) -> Any:
    """Every {{ }} output: a string over MAX_SHOWN characters is cut, and says so."""
    if isinstance(value, str) and not isinstance(value, Markup) and len(value) > MAX_SHOWN:
        return f"{value[:MAX_SHOWN]}… (cut: {len(value):,} characters in all)"
    return value


def number(value: Any, spec: str = "%.4g") -> str:
    """A number as `spec` formats it, for the templates' `number` filter; anything else (a
    bundle's string where a number belongs, a 400-digit integer float() refuses) is '–', not a
    500 for the whole page."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "–"
    try:
        x = float(value)
    except OverflowError:
        return "–"
    return spec % x if math.isfinite(x) else "unbounded"


_env = Environment(
    loader=PackageLoader("service.api", "templates"),
    autoescape=True,  # every template, whatever its name
    undefined=StrictUndefined,  # a misspelt variable fails the test, not renders as nothing
    trim_blocks=True,
    lstrip_blocks=True,
    finalize=_clip,
)
_env.filters["number"] = number


def render(
    template: str,
    status: int = 200,
    csp: str = CSP,
    headers: dict[str, str] | None = None,
    **ctx: Any,
) -> HTMLResponse:
    body = _env.get_template(template).render(**ctx)
    all_headers = {**HEADERS, "Content-Security-Policy": csp, **(headers or {})}
    return HTMLResponse(body, status_code=status, headers=all_headers)


def error_page(
    status: int, message: str, request_id: str | None, headers: dict[str, str] | None = None
) -> HTMLResponse:
    """What a person gets instead of a JSON error body on a page route (see errors.py)."""
    headers = {**(headers or {}), **({"x-request-id": request_id} if request_id else {})}
    return render(
        "error.html", status, headers=headers, code=status, message=message, request_id=request_id
    )
