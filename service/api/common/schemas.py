"""Response models every route family shares (also the OpenAPI documentation)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class ErrorBody(BaseModel):
    error: str
    details: list[dict[str, Any]] | None = None
    request_id: str | None = None


class Health(BaseModel):
    status: str
    reasons: list[str] = []
