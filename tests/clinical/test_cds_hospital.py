"""CDS Hooks with data as hospitals send it (issue 24): each case gets a card.

The EHR is played by `fulfil`: it runs discovery's prefetch templates as FHIR searches over the
records it holds, so what the service asks for is what it gets.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from cds_client import Signer, auth
from fhir_ehr import LOINC, diabetes_store, fulfil, hook_call, observation

DIABETES = "/cds-services/diabetes-progression"


def now() -> datetime:
    return datetime.now(UTC)


async def templates(ehr: httpx.AsyncClient, service: str) -> dict[str, str]:
    r = await ehr.get("/cds-services")
    (found,) = [s for s in r.json()["services"] if s["id"] == service]
    prefetch: dict[str, str] = found["prefetch"]
    return prefetch


async def card_for(
    ehr: httpx.AsyncClient, signer: Signer, store: list[dict[str, Any]]
) -> httpx.Response:
    prefetch = fulfil(await templates(ehr, "diabetes-progression"), store)
    return await ehr.post(DIABETES, json=hook_call(prefetch), headers=auth(signer, DIABETES))


def used(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    (card,) = r.json()["cards"]
    detail: str = card["detail"]
    return detail


async def test_a_newer_preliminary_result_does_not_hide_the_final_one(
    ehr: httpx.AsyncClient, es384: Signer
) -> None:
    t = now()
    store = diabetes_store(t)
    store.append(
        observation(
            "hdl-pre", LOINC, "2085-9", 52.0, "mg/dL", t - timedelta(hours=2), status="preliminary"
        )
    )
    detail = used(await card_for(ehr, es384, store))
    assert "Observation/hdl-1 (LOINC 2085-9)" in detail
    assert "hdl-pre" not in detail
