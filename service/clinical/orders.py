"""Which draft orders call for a service: an order-select or order-sign call's selected orders
against the service's order filters (`Service.orders` in a mapping), by resource type and by a
code of the order, of its medication, or of the Medication it contains."""

from __future__ import annotations

from service.clinical.records import system
from service.clinical.services import Service


def _codings(order: dict[str, object]) -> list[dict[str, object]]:
    """The codings of a draft order: its code, or its medication (R4 and R5 shapes), also as
    a reference to a contained Medication ("#med1", the common R4 shape: it was not read)."""
    found = []
    med = order.get("medication")
    for concept in (
        order.get("code"),
        order.get("medicationCodeableConcept"),
        med.get("concept") if isinstance(med, dict) else None,
        _contained_code(order, order.get("medicationReference")),
        _contained_code(order, med.get("reference") if isinstance(med, dict) else None),
    ):
        if isinstance(concept, dict) and isinstance(concept.get("coding"), list):
            found += [c for c in concept["coding"] if isinstance(c, dict)]
    return found


def _contained_code(order: dict[str, object], reference: object) -> object:
    """The code of the contained resource a local reference ({"reference": "#id"}) names."""
    ref = reference.get("reference") if isinstance(reference, dict) else None
    contained = order.get("contained")
    if not isinstance(ref, str) or not ref.startswith("#") or not isinstance(contained, list):
        return None
    for res in contained:
        if isinstance(res, dict) and res.get("id") == ref[1:]:
            return res.get("code")
    return None


def wanted(service: Service, orders: list[dict[str, object]]) -> bool:
    """Whether an order-select call's selected orders call for `service`."""
    if service.orders is None:
        return True
    for f in service.orders:
        for order in orders:
            if order.get("resourceType") != f.resource_type:
                continue
            if f.system is None:
                return True
            for c in _codings(order):
                code = c.get("code")
                if system(c.get("system")) == f.system and isinstance(code, str) and f.takes(code):
                    return True
    return False
