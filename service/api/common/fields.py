"""A query or header field read by the handler itself: validated by pydantic and documented in
OpenAPI as FastAPI would for a declared parameter, with FastAPI's error shape.

The prediction routes are answered with and without FastAPI's routing (`service/api/front.py`);
what their endpoints read, they read through this one reader, so both answer alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import TypeAdapter, ValidationError

from service.errors import InvalidInputError


@dataclass(frozen=True)
class Param:
    where: Literal["query", "header"]
    name: str
    annotation: Any  # the value's type, e.g. Annotated[int, Field(ge=0)]
    description: str
    _adapter: TypeAdapter[Any] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_adapter", TypeAdapter(self.annotation))

    def read(self, request: Request) -> Any:
        """The validated value, or None when absent; RequestValidationError when invalid."""
        if self.where == "query":
            if not request.scope["query_string"]:  # parsing an empty one cost 8 us a request
                return None
            given = request.query_params.getlist(self.name)
            if len(given) > 1:  # which copy a parser keeps must not decide (a FHIR subject)
                raise InvalidInputError(
                    f"the query parameter {self.name} appears {len(given)} times; send it once"
                )
            raw = given[0] if given else None
        else:
            raw = request.headers.get(self.name)
        if raw is None:
            return None
        try:
            return self._adapter.validate_python(raw)
        except ValidationError as exc:
            errors = exc.errors(include_url=False)
            raise RequestValidationError(
                [{**e, "loc": (self.where, self.name)} for e in errors]
            ) from None

    def openapi(self) -> dict[str, Any]:
        """The OpenAPI parameter FastAPI writes for an optional field of this type."""
        title = self.name[:1].upper() + self.name[1:]
        schema = {
            "anyOf": [self._adapter.json_schema(), {"type": "null"}],
            "description": self.description,
            "title": title,
        }
        return {
            "name": self.name,
            "in": self.where,
            "required": False,
            "schema": schema,
            "description": self.description,
        }


def inline_schema(model: Any) -> dict[str, Any]:
    """A pydantic model's JSON schema with every `$defs` reference replaced by its definition
    (for a request body declared through `openapi_extra`)."""
    schema: dict[str, Any] = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    resolved: dict[str, Any] = resolve(schema)
    return resolved
