"""CDS Hooks through the audit trail: the card's prediction, the issuer, the feedback, a replay."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from audit_support import Backend, serving
from cryptography.hazmat.primitives.asymmetric import ec

sys.path.insert(0, str(Path(__file__).parents[1] / "clinical"))  # the EHR of the CDS tests

from cds_client import BASE, ISS, Signer, auth
from fhir_ehr import MODELS, diabetes_prefetch, hook_call

from service.audit.replay import replay
from service.errors import AuditUnavailableError
from service.settings import CdsIssuer

SERVICE = "/cds-services/diabetes-progression"


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer(ec.generate_private_key(ec.SECP384R1()), "ES384", "audit-es384")


def cds_settings(backend: Backend, signer: Signer, **more: Any) -> dict[str, Any]:
    return {
        "cds_issuers": {ISS: CdsIssuer(jwks={"keys": [signer.public_jwk()]})},
        "public_base_url": BASE,
        **backend.settings,
        **more,
    }


async def issue_cards(ehr: Any, signer: Signer, n: int) -> list[str]:
    """The uuids of `n` cards the diabetes service issued."""
    cards = []
    for _ in range(n):
        body = hook_call(diabetes_prefetch(datetime.now(UTC)))
        r = await ehr.post(SERVICE, json=body, headers=auth(signer, SERVICE))
        assert r.status_code == 200, r.text
        cards.append(r.json()["cards"][0]["uuid"])
    return cards


async def test_cds_card_and_feedback_are_recorded(backend: Backend, signer: Signer) -> None:
    settings = {
        "cds_issuers": {ISS: CdsIssuer(jwks={"keys": [signer.public_jwk()]})},
        "public_base_url": BASE,
        **backend.settings,
    }
    async with serving(MODELS, **settings) as (app, ehr):
        body = hook_call(diabetes_prefetch(datetime.now(UTC)))
        r = await ehr.post(SERVICE, json=body, headers=auth(signer, SERVICE))
        assert r.status_code == 200, r.text
        [card] = r.json()["cards"]
        path = SERVICE + "/feedback"
        reason = card["overrideReasons"][0]
        fb = {
            "feedback": [
                {
                    "card": card["uuid"],
                    "outcome": "overridden",
                    "overrideReason": {"reason": reason, "userComment": "recent weight loss"},
                    "outcomeTimestamp": datetime.now(UTC).isoformat(),
                }
            ]
        }
        r2 = await ehr.post(path, json=fb, headers=auth(signer, path))
        assert r2.status_code == 200, r2.text
        # No room for a record: the card is not issued (fail closed), a FHIR OperationOutcome.
        app.state.audit.queue_size = 0
        again = hook_call(diabetes_prefetch(datetime.now(UTC)))
        r3 = await ehr.post(SERVICE, json=again, headers=auth(signer, SERVICE))
        assert r3.status_code == 503
        assert r3.json()["resourceType"] == "OperationOutcome"
        assert "audit" in r3.json()["issue"][0]["diagnostics"]
        app.state.audit.queue_size = 10
        assert await app.state.audit.flush(10)
        store = app.state.audit.store
        assert store.count() == 1
        [rec] = store.find(r.headers["x-request-id"])
        [feedback] = store.feedback(card["uuid"])
    assert rec.route == "/cds-services/{service_id}"
    assert rec.caller == ISS
    assert rec.card_uuid == card["uuid"]
    assert rec.model == "diabetes" and rec.referred is not None
    assert feedback["outcome"] == "overridden" and feedback["caller"] == ISS
    assert feedback["service_id"] == "diabetes-progression"
    assert "recent weight loss" in feedback["override_reason"]
    assert replay(rec, MODELS).identical


async def test_a_refused_feedback_call_records_none_of_its_items(
    backend: Backend, signer: Signer
) -> None:
    """Feedback items were queued one by one: with room for one of two, the call was a 503 with
    the first recorded, and the client's retry recorded it again. Now all or none; the ledger
    counts them once recorded. A large userComment weighs its size (it counted 1 KiB)."""
    async with serving(MODELS, **cds_settings(backend, signer)) as (app, ehr):
        cards = await issue_cards(ehr, signer, 2)
        writer = app.state.audit
        assert await writer.flush(10)
        path = SERVICE + "/feedback"
        comment = "x" * 100_000
        stamp = datetime.now(UTC).isoformat()
        fb = {
            "feedback": [
                {"card": c, "outcome": "overridden", "overrideReason": {"userComment": comment}}
                | {"outcomeTimestamp": stamp}
                for c in cards
            ]
        }
        writer.queue_size = writer.depth + 1  # room for one record
        r1 = await ehr.post(path, json=fb, headers=auth(signer, path))
        assert r1.status_code == 503 and writer.depth == 0
        assert sum(app.state.cds.ledger.outcomes.values()) == 0
        writer.queue_size = 10
        r2 = await ehr.post(path, json=fb, headers=auth(signer, path))  # the retry
        assert r2.status_code == 200, r2.text
        assert writer.depth == 2 and writer.depth_bytes > 2 * len(comment)
        assert await writer.flush(10)
        assert sum(app.state.cds.ledger.outcomes.values()) == 2
        for card in cards:
            assert len(writer.store.feedback(card)) == 1


async def test_failing_open_a_feedback_call_keeps_what_fits(
    backend: Backend, signer: Signer
) -> None:
    """All-or-none only lost more when the operator chose to fail open: it queued none of two
    items with room for one and counted one dropped (review R9). What fits is kept, each lost
    one counted."""
    settings = cds_settings(backend, signer, audit_fail_open=True)
    async with serving(MODELS, **settings) as (app, ehr):
        cards = await issue_cards(ehr, signer, 2)
        writer = app.state.audit
        assert await writer.flush(10)
        path = SERVICE + "/feedback"
        stamp = datetime.now(UTC).isoformat()
        fb = {
            "feedback": [
                {"card": c, "outcome": "overridden", "outcomeTimestamp": stamp} for c in cards
            ]
        }
        writer.queue_size = writer.depth + 1  # room for one record
        r = await ehr.post(path, json=fb, headers=auth(signer, path))
        assert r.status_code == 200, r.text
        assert writer.depth == 1 and writer.stats.dropped == 1


def test_failing_open_each_event_is_encoded_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The one-by-one retry after the byte bound encoded every event again: one that could not
    be encoded was counted invalid twice (review R10)."""
    from types import SimpleNamespace

    import service.audit.writer as writer_module

    calls: list[str] = []

    def encode(event: Any) -> str:
        calls.append(event.request_id)
        if event.request_id == "bad":
            raise ValueError("cannot encode")
        return "message"

    monkeypatch.setattr(writer_module, "message", encode)
    size = writer_module.MESSAGE_OVERHEAD  # what every message weighs at least
    monkeypatch.setattr(writer_module, "weight", lambda msg: size)
    writer = writer_module.AuditWriter(
        None, tmp_path / "a.db", fail_open=True, queue_bytes=2 * size + size // 2
    )
    writer._queue.append("held", size)  # room for one message more
    bad, good = SimpleNamespace(request_id="bad"), SimpleNamespace(request_id="good")
    writer.submit_all([bad, good, good])  # type: ignore[list-item]
    assert (writer.stats.invalid, writer.stats.dropped, writer.stats.queued) == (1, 1, 1)
    assert calls == ["bad", "good"]  # the last one found no room: not encoded
    # Full by count, or closed: nothing is encoded, each one is counted dropped (R11: all were
    # encoded first, on the event loop, while the store was down).
    calls.clear()
    writer.queue_size = len(writer._queue)
    writer.submit_all([good, good])  # type: ignore[list-item]
    writer._closed = True
    writer.submit_all([bad])  # type: ignore[list-item]
    assert calls == [] and (writer.stats.invalid, writer.stats.dropped) == (1, 4)
    # Full by bytes (the bound text records reach first): nothing encoded either (R12).
    writer._closed, writer.queue_size, writer.queue_bytes = False, 100, writer.depth_bytes
    writer.submit_all([good])  # type: ignore[list-item]
    assert calls == [] and writer.stats.dropped == 5
    # An empty queue takes one message over the bound, not a whole call's (R12).
    empty = writer_module.AuditWriter(None, tmp_path / "b.db", fail_open=False, queue_bytes=size)
    with pytest.raises(AuditUnavailableError):
        empty.submit_all([good, good])  # type: ignore[list-item]
    empty.submit_all([good])  # type: ignore[list-item]
    assert empty.stats.queued == 1
