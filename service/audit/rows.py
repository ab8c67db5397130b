"""The audit tables' rows, without torch: built in the audit writer's process, read back by the CLI.

The server hands the writer process compact messages (`record.message`): plain values, the
input array's bytes and the answer's JSON bytes. `prediction_row` turns one into a row: the
parameters as JSON, the inputs (or their keyed HMAC, and then the answer and seed sealed under
the key: seal.py), the referral decision read back from the answer's JSON (the decision the
client got). Nothing here imports torch or the engine, so that
process starts in a fraction of a second and holds little memory.
"""

from __future__ import annotations

import hashlib
import hmac
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, NamedTuple

import numpy as np
import orjson

from service.audit.seal import context, seal

InputsMode = Literal["store", "hmac"]
HMAC_PREFIX = "hmac-sha256:"
_HMAC_DOMAIN = b"mcserve-audit-inputs-v1\0"


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


def dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def utc(at: float) -> datetime:
    return datetime.fromtimestamp(at, UTC)


def layout(dtype: np.dtype[Any], shape: tuple[int, ...]) -> str:
    """`{"dtype", "shape"}` of an input array: stored beside its bytes, and the HMAC's header."""
    return dumps({"dtype": dtype.newbyteorder("=").name, "shape": list(shape)})


def little_endian(x: np.ndarray) -> np.ndarray:
    if x.dtype.byteorder == ">" or (x.dtype.byteorder == "=" and sys.byteorder == "big"):
        return np.ascontiguousarray(x, dtype=x.dtype.newbyteorder("<"))
    return np.ascontiguousarray(x)


def hmac_of(key: bytes, data: bytes, layout_json: str) -> str:
    """The keyed digest of an input array given as its little-endian bytes and layout."""
    mac = hmac.new(key, _HMAC_DOMAIN, hashlib.sha256)
    mac.update(layout_json.encode())
    mac.update(data)
    return HMAC_PREFIX + mac.hexdigest()


def inputs_hmac(key: bytes, x: np.ndarray) -> str:
    """A keyed digest of the engine input: dtype, shape and the little-endian bytes, so the
    same numbers give the same digest whether they came as arrays, named features or tensors."""
    a = little_endian(x)
    return hmac_of(key, a.tobytes(), layout(a.dtype, a.shape))


def key_id(key: bytes) -> str:
    """Names a key without revealing it (which key to use when the key is rotated)."""
    return hmac.new(key, b"mcserve-audit-key-id", hashlib.sha256).hexdigest()[:16]


def decode_inputs(data: bytes, layout_json: str) -> np.ndarray:
    spec = orjson.loads(layout_json)
    dtype = np.dtype(spec["dtype"]).newbyteorder("<")
    return np.frombuffer(bytes(data), dtype=dtype).reshape(spec["shape"]).astype(spec["dtype"])


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
    mac = hmac_of(key, msg.inputs, msg.inputs_layout) if key is not None else None
    summary, seed, params = msg.summary.decode(), msg.seed, msg.params
    if not store:
        # The answer and seed would let anyone test a guessed input against the public bundle:
        # kept only sealed under the key (seal.py). The referral decision and its triggers,
        # which name no value, stay in clear for queries.
        assert key is not None and mac is not None
        bound = context(mac, msg.request_id, msg.model, msg.version, msg.digest, msg.mode)
        summary, seed = seal(key, msg.seed, msg.summary, bound), None
        params = {**msg.params, "seed": None}
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
    """(table, row) of a message; ValueError for anything that is not one."""
    if isinstance(msg, PredictionMessage):
        return "audit_records", prediction_row(msg, ctx)
    if isinstance(msg, FeedbackMessage):
        return "audit_feedback", feedback_row(msg, ctx)
    raise ValueError(f"not an audit message: {type(msg).__name__} {str(msg)[:80]}")


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
