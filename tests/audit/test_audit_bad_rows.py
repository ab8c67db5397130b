"""A value the store cannot hold (a NUL in a PostgreSQL text, a number out of range) costs its
own record only: it is refused at the door where it can be (CDS feedback's outcomeTimestamp),
and otherwise left out of its batch, counted and logged, while the rest is written. Before, the
batch failed whole and was retried forever: nothing was written again, readiness stayed 503."""

from __future__ import annotations

import logging
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from audit_support import Backend, fake_request, serving
from cryptography.hazmat.primitives.asymmetric import ec

sys.path.insert(0, str(Path(__file__).parents[1] / "clinical"))  # the EHR of the CDS tests

from cds_client import BASE, ISS, Signer, auth
from fhir_ehr import MODELS, diabetes_prefetch, hook_call

from service.api.common import audit as api_audit
from service.audit.arrays import layout
from service.audit.rows import FeedbackMessage, PredictionMessage
from service.audit.sink import SinkClient
from service.settings import CdsIssuer

SERVICE = "/cds-services/diabetes-progression"
CTX = {"inputs": "store", "hmac_key": None, "software": "{}", "replica": "test-host"}
NUL_STAMP = "2026-12-07T03:00:00+00:00\x00"  # datetime.fromisoformat took it


def feedback(card: str, stamp: str | None = "2026-12-07T03:00:00Z") -> FeedbackMessage:
    return FeedbackMessage(
        time.time(), card, "overridden", None, stamp, "svc", "rid-" + card, "iss"
    )


def prediction(request_id: str, seed: int) -> PredictionMessage:
    return PredictionMessage(time.time(), request_id, "/v1/models/{name}:predict", None, "m",
                             "1", "sha256:0", "torch", "cpu", "mc", 10, seed, {"samples": 10}, 1,
                             b"\0" * 4, layout(np.dtype("float32"), (1, 1)),
                             b'{"predictions":[{}]}', None)  # fmt: skip


async def test_a_nul_in_feedback_is_refused_with_a_400(backend: Backend) -> None:
    signer = Signer(ec.generate_private_key(ec.SECP384R1()), "ES384", "bad-rows")
    settings = {
        "cds_issuers": {ISS: CdsIssuer(jwks={"keys": [signer.public_jwk()]})},
        "public_base_url": BASE,
        **backend.settings,
    }
    async with serving(MODELS, **settings) as (app, ehr):
        r = await ehr.post(
            SERVICE,
            json=hook_call(diabetes_prefetch(datetime.now(UTC))),
            headers=auth(signer, SERVICE),
        )
        [card] = r.json()["cards"]
        path = SERVICE + "/feedback"
        for stamp in (NUL_STAMP, "2026-12-07T03:00:00Z\n", "2026-12-07 03:00:00Z"):
            item = {"card": card["uuid"], "outcome": "overridden", "outcomeTimestamp": stamp}
            bad = await ehr.post(path, json={"feedback": [item]}, headers=auth(signer, path))
            assert bad.status_code == 400, (stamp, bad.text)
            [issue] = bad.json()["issue"]
            assert issue["diagnostics"].startswith(
                "invalid request: feedback.0.outcomeTimestamp: Value error, must be a FHIR instant "
                "with a time zone and no other characters (no spaces or control characters)"
            )
            assert "\x00" not in bad.text and "\\u0000" not in bad.text  # not echoed
        good = {**item, "outcomeTimestamp": datetime.now(UTC).isoformat()}
        ok = await ehr.post(path, json={"feedback": [good]}, headers=auth(signer, path))
        assert ok.status_code == 200, ok.text
        writer = app.state.audit
        assert await writer.flush(10)
        assert writer.healthy and writer.stats.invalid == 0
        assert writer.store.count("audit_feedback") == 1


async def test_a_row_the_store_cannot_hold_is_left_out_the_rest_written(
    backend: Backend, repo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Through the server: feedback with a NUL (as any adapter could send) among predictions."""
    body = {"instances": [[0.1, -0.2, 0.3, 0.4]], "parameters": {"seed": 1}}
    with caplog.at_level(logging.ERROR, logger="mcserve.audit"):
        async with serving(repo, **backend.settings) as (app, client):
            writer = app.state.audit
            fb = fake_request(app, "/cds-services/{id}/feedback", "fb-nul", "iss")
            event = api_audit.feedback_event(fb, "card-1", "accepted", outcome_timestamp=NUL_STAMP)
            api_audit.record_all(fb, [event])
            for _ in range(3):
                assert (await client.post("/v1/models/clf:predict", json=body)).status_code == 200
            # Before: the batch failed whole on PostgreSQL, forever (this flush timed out).
            assert await writer.flush(10), "the batch with the bad row was never written"
            assert writer.healthy and (await client.get("/readyz")).status_code == 200
            assert writer.stats.invalid == 1 and writer.stats.written == 3
            assert writer.store.count() == 3 and writer.store.count("audit_feedback") == 0
            assert "mcserve_audit_invalid_total 1.0" in (await client.get("/metrics")).text
    [logged] = [r for r in caplog.records if r.getMessage().startswith("audit event cannot be")]
    assert getattr(logged, "id", None) == "fb-nul"
    assert getattr(logged, "error", "").startswith(
        "audit_feedback.outcome_timestamp holds a NUL character (U+0000), which a PostgreSQL "
        "text column cannot store"
    )


def test_the_writer_process_isolates_rows_the_database_refuses(
    backend: Backend, tmp_path: Path
) -> None:
    """A seed past 64 bits passes every check before the database, which refuses it (PostgreSQL:
    bigint out of range; SQLite: too large an INTEGER): that row alone is left out."""
    path = backend.settings.get("audit_path", tmp_path / "unused.db")
    sink = SinkClient(backend.settings.get("audit_url"), path, CTX)
    sink.start()
    try:
        batch = [
            prediction("p-0", 1),
            feedback("c-1"),
            prediction("p-big", 2**64),
            feedback("c-nul", NUL_STAMP),
            prediction("p-3", 3),
            feedback("c-lone", "2026-12-07T03:00:00Z\ud800"),
            feedback("c-4"),
        ]
        written, invalid = sink.write(batch)  # type: ignore[arg-type]
        assert written == 4
        assert [i for i, _ in invalid] == [2, 3, 5]
        assert invalid[0][1].startswith("the database refused the row: ")
        assert "out of range" in invalid[0][1] or "too large" in invalid[0][1]
        assert "NUL character" in invalid[1][1] and "lone surrogate" in invalid[2][1]
        written, invalid = sink.write([prediction("p-after", 4)])  # the writer goes on
        assert (written, invalid) == (1, [])
    finally:
        sink.close()
    with backend.open() as store:
        assert [r.request_id for r in store.find("p-0") + store.find("p-3")] == ["p-0", "p-3"]
        assert store.find("p-big") == [] and store.count() == 3
        assert store.count("audit_feedback") == 2
