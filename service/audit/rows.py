"""The audit tables' rows, without torch: built in the audit writer's process, read back by the CLI.

The server hands the writer process compact messages (`record.message`): plain values, the
input array's bytes and the answer's JSON bytes. `prediction_row` turns one into a row: the
parameters as JSON, the inputs (or their keyed HMAC, and then the answer and seed sealed under
the key: seal.py), the referral decision read back from the answer's JSON (the decision the
client got). Nothing here imports torch or the engine, so that
process starts in a fraction of a second and holds little memory.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, NamedTuple

import numpy as np
import orjson

from service.audit.arrays import decode_inputs, dumps, engine_form, hmac_of, key_id
from service.audit.seal import context, seal

InputsMode = Literal["store", "hmac"]


class RowError(ValueError):
    """A message whose row no store can hold; the message says which field and why."""


class PredictionMessage(NamedTuple):
    """One answered prediction as the server hands it over (built by `record.message`)."""

    at: float
    request_id: str | None
    route: str
    caller: str | None
    model: str
    version: str
    digest: str
    backend: str
    device: str
    mode: str
    samples: int | None
    seed: int | None
    params: dict[str, Any]
    n_inputs: int
    inputs: bytes  # little-endian
    inputs_layout: str
    summary: bytes  # the answer's JSON
    card_uuid: str | None


class FeedbackMessage(NamedTuple):
    """A clinician's decision on a CDS card."""

    at: float
    card_uuid: str
    outcome: str
    override_reason: Any
    outcome_timestamp: str | None
    service_id: str | None
    request_id: str | None
    caller: str | None


Message = PredictionMessage | FeedbackMessage


@dataclass(frozen=True, eq=False)
class AuditRecord:
    """One stored prediction, as read back (`Store.find`)."""

    id: int
    recorded_at: datetime
    request_id: str | None
    route: str
    caller: str | None
    model: str
    version: str
    digest: str
    backend: str
    device: str
    mode: str
    samples: int | None
    seed: int | None
    params: dict[str, Any]
    n_inputs: int
    inputs: np.ndarray | None  # the engine's input, exactly, when stored
    inputs_hmac: str | None
    inputs_key_id: str | None
    summary: str  # the JSON text, byte for byte as recorded; sealed in hmac mode (seal.reveal)
    referral: list[dict[str, Any] | None] | None
    referred: bool | None
    card_uuid: str | None
    software: dict[str, Any]
    replica: str


def utc(at: float) -> datetime:
    return datetime.fromtimestamp(at, UTC)


def referral_of(summary: bytes) -> tuple[str | None, bool | None]:
    """(referral column, referred) from the answer's JSON: per input, `refer` and the triggers
    that fired (the reasons in words stay in the summary); None where no referral was made."""
    refs = [p.get("referral") for p in orjson.loads(summary)["predictions"]]
    if all(r is None for r in refs):  # deterministic mode: no referral policy applied
        return None, None
    decisions = [
        {"refer": r["refer"], "triggers": r["triggers"]} if r is not None else None for r in refs
    ]
    return dumps(decisions), any(r is not None and r["refer"] for r in decisions)


@dataclass(frozen=True)
class RowContext:
    """What every row of one writer process shares (sent once, at start-up)."""

    inputs: InputsMode
    hmac_key: bytes | None
    software: str  # JSON
    replica: str


def prediction_row(msg: PredictionMessage, ctx: RowContext) -> dict[str, Any]:
    """A message from `record.message` -> one `audit_records` row."""
    key = ctx.hmac_key
    if ctx.inputs != "store" and key is None:
        raise ValueError("audit_inputs='hmac' needs a key (setting audit_hmac_key)")
    referral, referred = referral_of(msg.summary)
    store = ctx.inputs == "store"
    # The HMAC is of the engine's array, also when its padding is not stored (arrays.py).
    mac = hmac_of(key, *engine_form(msg.inputs, msg.inputs_layout)) if key is not None else None
    summary, seed, params = msg.summary.decode(), msg.seed, msg.params
    if not store:
        # The answer and seed would let anyone test a guessed input against the public bundle:
        # kept only sealed under the key (seal.py). The referral decision and its triggers,
        # which name no value, stay in clear for queries.
        assert key is not None and mac is not None
        bound = context(mac, msg.request_id, msg.model, msg.version, msg.digest, msg.mode)
        summary, seed = seal(key, msg.seed, msg.summary, bound), None
        params = {**msg.params, "seed": None}
        form = params.get("representation")
        if isinstance(form, dict) and form.get("subject") is not None:
            # A patient reference beside the referral decision identifies; its HMAC (domain-
            # separated from the inputs') still lets a key holder find a patient's records.
            said = hmac.new(key, b"subject\0" + str(form["subject"]).encode(), "sha256")
            params["representation"] = {**form, "subject": None, "subject_hmac": said.hexdigest()}
    return {
        "recorded_at": utc(msg.at),
        "request_id": msg.request_id,
        "route": msg.route,
        "caller": msg.caller,
        "model": msg.model,
        "version": msg.version,
        "digest": msg.digest,
        "backend": msg.backend,
        "device": msg.device,
        "mode": msg.mode,
        "samples": msg.samples,
        "seed": seed,
        "params": dumps(params),
        "n_inputs": msg.n_inputs,
        "inputs": msg.inputs if store else None,
        "inputs_layout": msg.inputs_layout if store else None,
        "inputs_hmac": mac,
        "inputs_key_id": key_id(key) if key is not None else None,
        "summary": summary,
        "referral": referral,
        "referred": referred,
        "card_uuid": msg.card_uuid,
        "software": ctx.software,
        "replica": ctx.replica,
    }


def feedback_row(msg: FeedbackMessage, ctx: RowContext) -> dict[str, Any]:
    reason = msg.override_reason
    return {
        "recorded_at": utc(msg.at),
        "card_uuid": msg.card_uuid,
        "outcome": msg.outcome,
        "override_reason": dumps(reason) if reason is not None else None,
        "outcome_timestamp": msg.outcome_timestamp,
        "service_id": msg.service_id,
        "request_id": msg.request_id,
        "caller": msg.caller,
        "replica": ctx.replica,
    }


def row(msg: object, ctx: RowContext) -> tuple[str, dict[str, Any]]:
    """(table, row) of a message; ValueError for anything that is not one, or whose text no
    store can hold (`check_text`)."""
    if isinstance(msg, PredictionMessage):
        table, values = "audit_records", prediction_row(msg, ctx)
    elif isinstance(msg, FeedbackMessage):
        table, values = "audit_feedback", feedback_row(msg, ctx)
    else:
        raise ValueError(f"not an audit message: {type(msg).__name__} {str(msg)[:80]}")
    check_text(table, values)
    return table, values


def check_text(table: str, values: dict[str, Any]) -> None:
    """Refuse a row with a text PostgreSQL cannot store: a NUL character (its TEXT holds none;
    COPY fails the whole batch) or a lone surrogate (not UTF-8). Checked here, for SQLite too,
    so that both stores keep the same rows and the reason is said exactly."""
    for column, v in values.items():
        if not isinstance(v, str):
            continue
        if "\x00" in v:
            raise RowError(
                f"{table}.{column} holds a NUL character (U+0000), which a PostgreSQL text "
                "column cannot store; the event was not recorded (its sender should refuse "
                "control characters in this field)"
            )
        if not v.isascii():
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise RowError(
                    f"{table}.{column} holds a lone surrogate (not valid Unicode); the event "
                    "was not recorded"
                ) from None


RECORD_COLUMNS = (
    "recorded_at",
    "request_id",
    "route",
    "caller",
    "model",
    "version",
    "digest",
    "backend",
    "device",
    "mode",
    "samples",
    "seed",
    "params",
    "n_inputs",
    "inputs",
    "inputs_layout",
    "inputs_hmac",
    "inputs_key_id",
    "summary",
    "referral",
    "referred",
    "card_uuid",
    "software",
    "replica",
)
FEEDBACK_COLUMNS = (
    "recorded_at",
    "card_uuid",
    "outcome",
    "override_reason",
    "outcome_timestamp",
    "service_id",
    "request_id",
    "caller",
    "replica",
)


def from_row(row: dict[str, Any]) -> AuditRecord:
    """A stored row (column name -> value; JSON columns as text) back to an `AuditRecord`."""
    at = row["recorded_at"]
    if isinstance(at, str):
        at = datetime.fromisoformat(at)
    # In UTC, as documented: PostgreSQL gives a TIMESTAMPTZ in the session's time zone.
    at = at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)

    def load(col: str) -> Any:
        v = row[col]
        return orjson.loads(v) if v is not None else None

    referred = row["referred"]
    return AuditRecord(
        id=int(row["id"]),
        recorded_at=at,
        request_id=row["request_id"],
        route=row["route"],
        caller=row["caller"],
        model=row["model"],
        version=row["version"],
        digest=row["digest"],
        backend=row["backend"],
        device=row["device"],
        mode=row["mode"],
        samples=row["samples"],
        seed=row["seed"],
        params=load("params"),
        n_inputs=int(row["n_inputs"]),
        inputs=decode_inputs(row["inputs"], row["inputs_layout"]) if row["inputs"] else None,
        inputs_hmac=row["inputs_hmac"],
        inputs_key_id=row["inputs_key_id"],
        summary=row["summary"],
        referral=load("referral"),
        referred=None if referred is None else bool(referred),
        card_uuid=row["card_uuid"],
        software=load("software"),
        replica=row["replica"],
    )
