"""The bundled models served in-process with CDS Hooks on, and the EHR's signing keys."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
from cds_client import BASE, ISS, Signer
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from fastapi import FastAPI
from fhir_ehr import MODELS

from service.api.app import create_app
from service.settings import CdsIssuer, Settings


@pytest.fixture(scope="session")
def es384() -> Signer:
    return Signer(ec.generate_private_key(ec.SECP384R1()), "ES384", "ehr-es384")


@pytest.fixture(scope="session")
def rs384() -> Signer:
    return Signer(
        rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS384", "ehr-rs384"
    )


@pytest.fixture(scope="session")
def jwks(es384: Signer, rs384: Signer) -> dict[str, Any]:
    return {"keys": [es384.public_jwk(), rs384.public_jwk()]}


@pytest_asyncio.fixture(scope="session")
async def cds_app(jwks: dict[str, Any]) -> AsyncIterator[FastAPI]:
    settings = Settings(
        model_dir=MODELS,
        cds_issuers={ISS: CdsIssuer(jwks=jwks)},
        public_base_url=BASE,
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        yield app


@pytest_asyncio.fixture(scope="session")
async def ehr(cds_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=cds_app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


@pytest.fixture
def missing_data_412(cds_app: FastAPI, monkeypatch: pytest.MonkeyPatch) -> None:
    """Missing data answered as CDS Hooks 2.0 has it: a 412 OperationOutcome, no card."""
    clinical = cds_app.state.cds
    strict = clinical.settings.model_copy(update={"cds_missing_data": "412"})
    monkeypatch.setattr(clinical, "settings", strict)
