"""CDS Hooks request bodies: a hook call and a feedback report (CDS Hooks 2.0).

Unknown top-level keys are allowed (the specification's `extension` and later additions).
`fhirAuthorization` is never logged or echoed; its token is sent only to a `fhirServer` on the
issuer's allow-list, to fetch what the prefetch lacks (`fetch.py`).
"""

from __future__ import annotations

import re
from datetime import date
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from service.clinical.records import FHIR_ID, array
from service.errors import InvalidInputError, json_hint, shown_name
from service.json_body import json_body

# FHIR's instant (https://hl7.org/fhir/datatypes.html#instant): a time zone, no control
# characters. datetime.fromisoformat alone took "2025-06-01T12:00:00+00:00\x00" (a NUL, which
# PostgreSQL text cannot store: the audit store refused the batch it was in), spaces, week dates.
FHIR_INSTANT = re.compile(
    r"([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)-(0[1-9]|1[0-2])-(0[1-9]|[1-2][0-9]|3[0-1])"
    r"T([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]{1,9})?"
    r"(Z|(\+|-)((0[0-9]|1[0-3]):[0-5][0-9]|14:00))"
)
ORDER_HOOKS = ("order-select", "order-sign")  # hooks about draft orders (services filter them)
SAFE_ID = r"^[A-Za-z0-9._:-]{1,128}$"  # hookInstance and card ids are logged: keep them plain
# Context keys each hook must carry (CDS Hooks hook definitions; optional ones are not listed).
REQUIRED_CONTEXT: dict[str, tuple[str, ...]] = {
    "patient-view": ("userId", "patientId"),
    "order-select": ("userId", "patientId", "selections", "draftOrders"),
    "order-sign": ("userId", "patientId", "draftOrders"),
}


class HookRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    hook: str = Field(min_length=1)
    hookInstance: str = Field(pattern=SAFE_ID)
    context: dict[str, Any]
    prefetch: dict[str, Any] | None = None
    fhirServer: str | None = None
    fhirAuthorization: dict[str, Any] | None = Field(default=None, repr=False)

    def patient_id(self, hook: str) -> str:
        """Check the call is for `hook` with its context; return the patient's id."""
        if self.hook != hook:
            raise InvalidInputError(f"this service answers the '{hook}' hook, not '{self.hook}'")
        missing = [k for k in REQUIRED_CONTEXT.get(hook, ()) if self.context.get(k) in (None, "")]
        if missing:
            raise InvalidInputError(f"context of '{hook}' lacks {missing}")
        pid = self.context["patientId"]
        # Both are written into the suggested resource's references (subject, encounter): a
        # newline, slash or space there made an invalid resource for the chart.
        enc = self.context.get("encounterId") or None  # "" is no encounter, as before
        for key, value in (("patientId", pid), ("encounterId", enc)):
            if (value is not None or key == "patientId") and not (
                isinstance(value, str) and FHIR_ID.fullmatch(value)
            ):
                raise InvalidInputError(
                    f"context.{key} must be a FHIR id: 1-64 of A-Z, a-z, 0-9, '-' and '.' "
                    f"(got {shown_name(repr(value))})"
                )
        if hook == "order-select" and not isinstance(self.context["selections"], list):
            raise InvalidInputError("context.selections must be an array of references")
        if hook in ORDER_HOOKS and not isinstance(self.context["draftOrders"], dict):
            raise InvalidInputError("context.draftOrders must be a FHIR Bundle")
        return pid

    def selected(self) -> list[dict[str, Any]]:
        """The orders the call is about: order-select's selections among the draft orders;
        order-sign's draft orders, all of them (they are about to be signed)."""
        wanted = {
            s for s in array(self.context.get("selections"), "context.selections")
            if isinstance(s, str)
        }  # fmt: skip
        drafts = self.context.get("draftOrders") or {}  # a dict: checked when the call is read
        out = []
        for entry in array(drafts.get("entry"), "context.draftOrders.entry"):
            res = entry.get("resource") if isinstance(entry, dict) else None
            if not isinstance(res, dict):
                continue
            if self.hook == "order-sign" or f"{res.get('resourceType')}/{res.get('id')}" in wanted:
                out.append(res)
        return out

    def encounter(self) -> str | None:
        enc = self.context.get("encounterId")
        return f"Encounter/{enc}" if isinstance(enc, str) and enc else None


class Coding(BaseModel):
    model_config = ConfigDict(extra="allow")

    code: str = Field(min_length=1)
    system: str | None = None
    display: str | None = None


class OverrideReason(BaseModel):
    model_config = ConfigDict(extra="allow")

    reason: Coding | None = None
    userComment: str | None = None


class AcceptedSuggestion(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str = Field(min_length=1)


class FeedbackItem(BaseModel):
    model_config = ConfigDict(extra="allow")

    card: str = Field(pattern=SAFE_ID)
    outcome: Literal["accepted", "overridden"]
    acceptedSuggestions: list[AcceptedSuggestion] | None = None
    overrideReason: OverrideReason | None = None
    outcomeTimestamp: str = Field(min_length=1)

    @field_validator("outcomeTimestamp")
    @classmethod
    def _instant(cls, v: str) -> str:
        if FHIR_INSTANT.fullmatch(v) is None:  # fullmatch: "$" would let a final newline pass
            raise ValueError(
                "must be a FHIR instant with a time zone and no other characters (no spaces or "
                "control characters), e.g. 2025-06-01T12:00:00Z"
            )
        try:
            date.fromisoformat(v[:10])  # the pattern lets 2025-02-30 through
        except ValueError:
            raise ValueError(f"must be a FHIR instant: {v[:10]} is not a date") from None
        return v

    @model_validator(mode="after")
    def _accepted(self) -> FeedbackItem:
        # CDS Hooks 2.0: acceptedSuggestions is required for accepted outcomes.
        if self.outcome == "accepted" and not self.acceptedSuggestions:
            raise ValueError("an accepted card's feedback names its acceptedSuggestions")
        return self


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    feedback: list[FeedbackItem] = Field(min_length=1, max_length=100)


T = TypeVar("T", bound=BaseModel)


def parse(model: type[T], raw: bytes) -> T:
    """Validate a JSON body; errors say where, without echoing values (they may be tokens)."""
    try:
        return model.model_validate_json(json_body(raw))
    except ValidationError as exc:
        errs = exc.errors(include_input=False)
        details = [
            {
                "field": ".".join(str(p) for p in e.get("loc", ())) or "body",
                "problem": e.get("msg", ""),
            }
            for e in errs
        ]
        first = details[0]
        hint = json_hint(first["problem"]) if errs[0].get("type") == "json_invalid" else ""
        raise InvalidInputError(
            f"invalid request: {first['field']}: {first['problem']}{hint}", details
        ) from None
