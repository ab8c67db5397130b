"""Codes and concepts a clinical mapping names, held to what FHIR allows of them.

A mapping's codes end up in FHIR resources (the concept predicted, the unit of a regressor's
value), in OperationOutcome issues and in discovery's prefetch queries. `fhir.resources`
validates the resources only when a call is answered, so a mapping with an empty `display` or
a code with a leading space loaded fine and then made every call a 500: they are refused when
the mapping is read, naming the field. Lists are bounded (`Capped`): a mapping is read on the
event loop, and no real one lists thousands of concepts.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from service.clinical.records import system as canonical_system

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
MAX_ENTRIES = 1000  # per list of a mapping (observations, derived, codes, services, ...)
FHIR_CODE = re.compile(r"[^\s]+( [^\s]+)*")  # FHIR's `code` type
FHIR_URI = re.compile(r"\S+")  # FHIR's `uri` type, not empty
# Characters that would change a FHIR search (discovery's prefetch query) if a code or system
# held them: `&` adds a parameter (`2345-7&patient=OTHER`), `,` splits the code list, `|` the
# system from the code, `#`/`?` end the query, `%`/`+` decode to something else, `\`/`$` are
# FHIR search escapes, braces could form a template variable.
QUERY_UNSAFE = frozenset("|,&#?%+\\${}")

T = TypeVar("T")


def _cap(value: Any) -> Any:
    if isinstance(value, list | dict) and len(value) > MAX_ENTRIES:
        raise ValueError(
            f"{len(value)} entries, over the limit of {MAX_ENTRIES} per list (a mapping names "
            "each concept once; split it into mappings of fewer quantities)"
        )
    return value


# A list of at most MAX_ENTRIES, refused before its entries are validated.
Capped = Annotated[list[T], BeforeValidator(_cap)]
capped = BeforeValidator(_cap)  # the same for a dict field


def query_problem(value: str) -> str | None:
    """Why `value` (a code or system) cannot go into a FHIR search unescaped, or None."""
    bad = sorted({c for c in value if c in QUERY_UNSAFE or not "!" <= c <= "~"})
    if not bad:
        return None
    shown = " ".join(repr(c) for c in bad)
    return (
        f"{value!r} holds {shown}: a code or system put into the prefetch query (a FHIR "
        "search) may hold printable ASCII only, without whitespace or any of | , & # ? % + \\ "
        "$ { }"
    )


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Code(Strict):
    system: str = Field(min_length=1)
    code: str = Field(min_length=1)
    display: str | None = None
    # What the code measures, where a unit could contradict it (LOINC's MCnc / SCnc): a result
    # coded as a mass concentration but sent in mmol/L is refused, not silently converted.
    kind: Literal["mass", "substance"] | None = None

    @field_validator("system")
    @classmethod
    def _canonical(cls, v: str) -> str:
        # As incoming codings are read (records.system): a mapping may name a system by its OID.
        out = str(canonical_system(v))
        if not FHIR_URI.fullmatch(out):
            raise ValueError(f"system {v!r} is not a FHIR uri (not blank, no whitespace)")
        return out

    @field_validator("code")
    @classmethod
    def _code(cls, v: str) -> str:
        if not FHIR_CODE.fullmatch(v):
            raise ValueError(
                f"code {v!r} is not a FHIR code: no leading, trailing or repeated whitespace "
                r"(FHIR's pattern ^[^\s]+( [^\s]+)*$)"
            )
        return v

    @field_validator("display")
    @classmethod
    def _display(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError(
                f"display {v!r} is blank: give the code's display text or leave display out "
                "(FHIR has no empty strings)"
            )
        return v

    def label(self) -> str:
        system = "LOINC" if self.system == LOINC else self.system
        return f"{system} {self.code}"

    def coding(self) -> dict[str, str]:
        """As a FHIR Coding (`kind` is this service's own, not FHIR's)."""
        out = {"system": self.system, "code": self.code}
        return out | ({"display": self.display} if self.display else {})


class Concept(Strict):
    """A CodeableConcept for what a model predicts (the outcome of a classifier, a target)."""

    text: str
    coding: Capped[Code] = Field(default_factory=list)

    @field_validator("text")
    @classmethod
    def _text(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("text is blank: name what is predicted (FHIR has no empty strings)")
        return v
