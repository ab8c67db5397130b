"""Hook calls whose FHIR holds a field of the wrong type: a 400 naming it, or a card saying what
was skipped, never a 500 (each case was a 500 found by a probe of the running server)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from cds_client import Signer, auth
from fhir_ehr import diabetes_store, fulfil, hook_call

DIABETES = "/cds-services/diabetes-progression"
ORDER_SELECT = "/cds-services/diabetes-progression-order-select"


async def _prefetch(ehr: httpx.AsyncClient, service: str) -> dict[str, Any]:
    r = await ehr.get("/cds-services")
    (found,) = [s for s in r.json()["services"] if s["id"] == service]
    return fulfil(found["prefetch"], diabetes_store(datetime.now(UTC)))


def _first_observation(prefetch: dict[str, Any]) -> dict[str, Any]:
    for value in prefetch.values():
        if isinstance(value, dict) and value.get("resourceType") == "Bundle":
            for e in value.get("entry") or []:
                if e["resource"]["resourceType"] == "Observation":
                    obs: dict[str, Any] = e["resource"]
                    return obs
    raise AssertionError("no Observation prefetched")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda p: p.__setitem__(
                next(k for k, v in p.items() if v and v.get("resourceType") == "Bundle"),
                {"resourceType": "Bundle", "type": "searchset", "entry": 5},
            ),
            ".entry must be a JSON array, got int",
        ),
        (
            lambda p: _first_observation(p).__setitem__("component", 5),
            ".component must be a JSON array, got int",
        ),
    ],
    ids=["bundle-entry", "observation-component"],
)
async def test_a_field_of_the_wrong_type_is_a_400_naming_it(
    ehr: httpx.AsyncClient, es384: Signer, change: Any, message: str
) -> None:
    prefetch = await _prefetch(ehr, "diabetes-progression")
    change(prefetch)
    r = await ehr.post(DIABETES, json=hook_call(prefetch), headers=auth(es384, DIABETES))
    assert r.status_code == 400, r.text
    assert message in r.text


async def test_draft_orders_of_the_wrong_type_are_a_400(
    ehr: httpx.AsyncClient, es384: Signer
) -> None:
    prefetch = await _prefetch(ehr, "diabetes-progression-order-select")
    for drafts, said in (
        ({"resourceType": "Bundle", "entry": 5}, "context.draftOrders.entry must be a JSON array"),
        ([], "context.draftOrders must be a FHIR Bundle"),
    ):
        body = hook_call(
            prefetch, hook="order-select", selections=["MedicationRequest/mr-1"], draftOrders=drafts
        )
        r = await ehr.post(ORDER_SELECT, json=body, headers=auth(es384, ORDER_SELECT))
        assert r.status_code == 400 and said in r.text, r.text


async def test_a_value_too_large_for_a_float_is_not_finite(
    ehr: httpx.AsyncClient, es384: Signer
) -> None:
    prefetch = await _prefetch(ehr, "diabetes-progression")
    obs = _first_observation(prefetch)
    obs["valueQuantity"]["value"] = 10**400
    r = await ehr.post(DIABETES, json=hook_call(prefetch), headers=auth(es384, DIABETES))
    assert r.status_code == 200, r.text
    assert f"Observation/{obs['id']} has no finite value" in r.text
