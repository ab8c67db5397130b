"""The CDS services a clinical mapping offers: id, hook, and for the order hooks the draft
orders that call for them (`orders.py` reads a call's orders against them)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from service.clinical.records import system
from service.clinical.terms import Capped, Strict

Hook = Literal["patient-view", "order-select", "order-sign"]


class OrderFilter(Strict):
    """Selected draft orders that call for an order-select service: of `resource_type`, and when
    `system` is given, coded in it with a code starting with one of `prefixes` (a hierarchical
    system: ATC A10, drugs used in diabetes) or equal to one of `codes` (a flat one: RxNorm
    concepts); with neither, any code of `system`."""

    resource_type: str = Field(min_length=1)
    system: str | None = None
    prefixes: Capped[str] = Field(default_factory=list)
    codes: Capped[str] = Field(default_factory=list)

    @field_validator("system")
    @classmethod
    def _canonical(cls, v: str | None) -> str | None:
        return None if v is None else str(system(v))

    def takes(self, code: str) -> bool:
        if not self.prefixes and not self.codes:
            return True
        return code in self.codes or code.startswith(tuple(self.prefixes))


class Service(Strict):
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")
    hook: Hook
    title: str = Field(min_length=1)
    description: str = Field(min_length=1)
    # order-select / order-sign: the selected (or to be signed) orders that call for this
    # service (None: any); a call with none of them answers {"cards": []} without computing.
    orders: Capped[OrderFilter] | None = None
