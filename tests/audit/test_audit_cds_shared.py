"""Two replicas sharing the audit trail's PostgreSQL: a token replayed on the other replica is
refused, and feedback reaches the replica that did not issue the card (issue 24 item 5)."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from audit_proxy import Proxy
from audit_support import Backend, execute, pg_backend, serving
from cryptography.hazmat.primitives.asymmetric import ec

sys.path.insert(0, str(Path(__file__).parents[1] / "clinical"))  # the EHR of the CDS tests

from cds_client import BASE, ISS, Signer, auth
from fhir_ehr import MODELS, diabetes_prefetch, hook_call

from service.settings import CdsIssuer

SERVICE = "/cds-services/diabetes-progression"


@pytest.fixture
def pg(postgres: str) -> Iterator[Backend]:
    yield from pg_backend(postgres)


async def test_two_replicas_share_replay_and_card_memory(pg: Backend) -> None:
    signer = Signer(ec.generate_private_key(ec.SECP384R1()), "ES384", "shared-es384")
    settings = {
        "cds_issuers": {ISS: CdsIssuer(jwks={"keys": [signer.public_jwk()]})},
        "public_base_url": BASE,
        "audit": False,  # the shared memory needs only the database (audit_url)
        **pg.settings,
    }
    async with serving(MODELS, **settings) as (_, a), serving(MODELS, **settings) as (_, b):
        body = hook_call(diabetes_prefetch(datetime.now(UTC)))
        headers = auth(signer, SERVICE)
        r = await a.post(SERVICE, json=body, headers=headers)
        assert r.status_code == 200, r.text
        (card,) = r.json()["cards"]
        # The same token at the other replica: a replay (each replica alone would accept it).
        r = await b.post(SERVICE, json=body, headers=headers)
        assert (r.status_code, r.content) == (401, b"")
        # Feedback on the card at the replica that did not issue it.
        path = SERVICE + "/feedback"
        fb = {
            "card": card["uuid"],
            "outcome": "accepted",
            "acceptedSuggestions": [{"id": card["suggestions"][0]["uuid"]}],
            "outcomeTimestamp": datetime.now(UTC).isoformat(),
        }
        r = await b.post(path, json={"feedback": [fb]}, headers=auth(signer, path))
        assert r.status_code == 200, r.text
        # A fresh token still works on either replica.
        r = await b.post(SERVICE, json=body, headers=auth(signer, SERVICE))
        assert r.status_code == 200
    assert execute(pg, "SELECT count(*) FROM mcserve_cds_jti") == 3
    assert execute(pg, "SELECT count(*) FROM mcserve_cds_cards") == 2


async def test_a_stalled_shared_memory_refuses_at_once_with_a_503(
    via_proxy: tuple[Backend, Proxy],
) -> None:
    """Behind a stalled connection the calls waited in single file, 5 s each (the sixth for 40
    s), then got a 401, as if their login were wrong. One deadline covers the wait and the
    query, later calls fail at once for a pause, and the answer is a 503 to retry elsewhere."""
    import asyncio
    import time

    from service.clinical import shared

    backend, proxy = via_proxy
    signer = Signer(ec.generate_private_key(ec.SECP384R1()), "ES384", "stall-es384")
    settings = {
        "cds_issuers": {ISS: CdsIssuer(jwks={"keys": [signer.public_jwk()]})},
        "public_base_url": BASE,
        "audit": False,
        **backend.settings,
    }
    body = hook_call(diabetes_prefetch(datetime.now(UTC)))
    async with serving(MODELS, **settings) as (app, client):
        memory = app.state.cds.shared
        memory.timeout_s = 1.0
        r = await client.post(SERVICE, json=body, headers=auth(signer, SERVICE))
        assert r.status_code == 200, r.text  # connected, tables made
        proxy.freeze()
        began = time.monotonic()
        answers = await asyncio.gather(
            *(client.post(SERVICE, json=body, headers=auth(signer, SERVICE)) for _ in range(6))
        )
        took = time.monotonic() - began
        assert [a.status_code for a in answers] == [503] * 6, [a.text for a in answers]
        # All within one deadline (and slack), not one after another: 6 s in single file.
        assert took < 1.0 + 2.5, took
        assert "cannot be checked for reuse" in answers[0].text
        assert "retry with a new token" in answers[0].text
        # When this replica checks again: its pause, said the way overload says it.
        waits = {int(a.headers["retry-after"]) for a in answers}
        assert waits <= set(range(1, math.ceil(shared.PAUSE_S) + 1)), waits
        proxy.thaw()
        await asyncio.sleep(shared.PAUSE_S)  # after the pause, a new connection
        r = await client.post(SERVICE, json=body, headers=auth(signer, SERVICE))
        assert r.status_code == 200, r.text


async def test_a_stall_while_connecting_and_a_bad_value_keep_their_bounds(
    via_proxy: tuple[Backend, Proxy],
) -> None:
    """A stall in the connection's set-up (its schema statements) held the call for its
    deadline plus psycopg's own 10 s of cancelling; a value a statement cannot hold (a NUL in
    a jti) threw the healthy connection away and refused every token for the pause."""
    import time

    from service.clinical.shared import SharedMemory, SharedUnavailable

    backend, proxy = via_proxy
    url = str(backend.settings["audit_url"])
    memory = SharedMemory(url, timeout_s=1.0)
    proxy.freeze_on = b"pg_advisory_xact_lock"
    began = time.monotonic()
    with pytest.raises(SharedUnavailable):
        await memory.first_use("iss", "jti-1", time.time() + 60, time.time())
    assert time.monotonic() - began < 1.0 + 2.5  # not 11 s
    proxy.thaw()
    proxy.freeze_on = None
    await memory.close()
    memory = SharedMemory(url, timeout_s=5.0)
    assert await memory.first_use("iss", "jti-2", time.time() + 60, time.time())
    with pytest.raises(SharedUnavailable, match="DataError"):
        await memory.first_use("iss", "bad\x00jti", time.time() + 60, time.time())
    assert await memory.first_use("iss", "jti-3", time.time() + 60, time.time())  # at once
    await memory.close()


async def test_a_cancelled_caller_and_a_closed_memory_leave_no_statement_behind(
    pg: Backend,
) -> None:
    """A caller cancelled from outside left its statement running on the kept connection:
    the next call queued behind it timed out on a healthy database (and its connection was
    then closed under the statement). And close() did not stop the memory: a call waiting
    for it opened a new connection that nothing closed."""
    import asyncio
    import time

    import psycopg

    from service.clinical.shared import SharedMemory, SharedUnavailable

    url = str(pg.settings["audit_url"])
    memory = SharedMemory(url, timeout_s=1.0)
    assert await memory.first_use("iss", "jti-a", time.time() + 60, time.time())
    with psycopg.connect(url) as holder:  # holds the row a first use will wait on
        holder.execute(
            "INSERT INTO mcserve_cds_jti VALUES ('iss', 'held', %s)", (time.time() + 60,)
        )
        blocked = asyncio.create_task(memory.first_use("iss", "held", time.time() + 60, 0.0))
        await asyncio.sleep(0.2)
        blocked.cancel()
        await asyncio.gather(blocked, return_exceptions=True)
        began = time.monotonic()
        assert await memory.first_use("iss", "jti-b", time.time() + 60, time.time())
        assert time.monotonic() - began < 0.5  # at once, not behind the cancelled statement
        holder.rollback()
    await memory.close()
    with pytest.raises(SharedUnavailable, match="shut down"):
        await memory.first_use("iss", "jti-c", time.time() + 60, time.time())
    assert memory._conn is None  # nothing opened after close()
