"""What the audit trail keeps for one prediction, and for one piece of CDS feedback.

The request path hands over references only (`PredictionEvent`: the model, the input array, the
parameters and the engine's `Prediction`); the writer's thread turns them into a row
(`prediction_row`): the summary JSON, the inputs (or their keyed HMAC), the referral decision.
The summary is the native answer's JSON for that prediction (`service.api.encode.response`),
whatever the route: the numbers the client got, in one canonical form that a replay can
recompute and compare byte for byte.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import importlib.metadata
import platform
import socket
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np
import orjson
import torch

from service.api.encode import referrals, response_json
from service.engine.model import Prediction, PredictParams, ServedModel

InputsMode = Literal["store", "hmac"]
HMAC_PREFIX = "hmac-sha256:"
_HMAC_DOMAIN = b"mcserve-audit-inputs-v1\0"


@dataclass(eq=False)
class PredictionEvent:
    """One prediction as the request path saw it (cheap to build: no encoding here)."""

    at: float  # time.time() when the answer was ready
    request_id: str | None
    route: str
    caller: str | None  # API key id, or the CDS client's `iss`
    model: ServedModel
    x: np.ndarray  # the engine's input, [B, *input_shape]
    params: PredictParams
    prediction: Prediction
    card_uuid: str | None = None
    row: dict[str, Any] | None = field(default=None, repr=False)  # filled once, by the writer


@dataclass(eq=False)
class FeedbackEvent:
    """A clinician's decision on a CDS card (CDS Hooks feedback), linked by the card's uuid."""

    at: float
    card_uuid: str
    outcome: str  # accepted | overridden
    override_reason: Any = None  # the CDS `overrideReason` object, as sent
    outcome_timestamp: str | None = None
    service_id: str | None = None
    request_id: str | None = None
    caller: str | None = None
    row: dict[str, Any] | None = field(default=None, repr=False)


Event = PredictionEvent | FeedbackEvent


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
    summary: str  # the JSON text, byte for byte as recorded
    referral: list[dict[str, Any] | None] | None
    referred: bool | None
    card_uuid: str | None
    software: dict[str, Any]
    replica: str


def dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def utc(at: float) -> datetime:
    return datetime.fromtimestamp(at, UTC)


def inputs_hmac(key: bytes, x: np.ndarray) -> str:
    """A keyed digest of the engine input: dtype, shape and the little-endian bytes, so the
    same numbers give the same digest whether they came as arrays, named features or tensors."""
    a = np.ascontiguousarray(x, dtype=x.dtype.newbyteorder("<"))
    mac = hmac.new(key, _HMAC_DOMAIN, hashlib.sha256)
    mac.update(dumps({"dtype": a.dtype.name, "shape": list(a.shape)}).encode())
    mac.update(a.tobytes())
    return HMAC_PREFIX + mac.hexdigest()


def key_id(key: bytes) -> str:
    """Names a key without revealing it (which key to use when the key is rotated)."""
    return hmac.new(key, b"mcserve-audit-key-id", hashlib.sha256).hexdigest()[:16]


def encode_inputs(x: np.ndarray) -> tuple[bytes, str]:
    """The input array's bytes (little-endian: exact, and a fifth of its JSON) and its layout."""
    a = _little_endian(x)
    return a.tobytes(), _layout(a.dtype, a.shape)


def _little_endian(x: np.ndarray) -> np.ndarray:
    if x.dtype.byteorder == ">" or (x.dtype.byteorder == "=" and sys.byteorder == "big"):
        return np.ascontiguousarray(x, dtype=x.dtype.newbyteorder("<"))
    return np.ascontiguousarray(x)


@functools.lru_cache(maxsize=256)
def _layout(dtype: np.dtype[Any], shape: tuple[int, ...]) -> str:
    # Cached: numpy's dtype.name alone cost 3.5 us per record on the audit thread.
    return dumps({"dtype": dtype.newbyteorder("=").name, "shape": list(shape)})


def decode_inputs(data: bytes, layout: str) -> np.ndarray:
    spec = orjson.loads(layout)
    dtype = np.dtype(spec["dtype"]).newbyteorder("<")
    return np.frombuffer(bytes(data), dtype=dtype).reshape(spec["shape"]).astype(spec["dtype"])


def summary_json(model: ServedModel, pred: Prediction) -> str:
    return response_json(model, pred).decode()


@functools.cache
def software() -> dict[str, Any]:
    """What else decides the last bits of a float: a replay compares it with its own."""
    import onnxruntime

    try:
        mcserve = importlib.metadata.version("mcserve")
    except importlib.metadata.PackageNotFoundError:
        mcserve = "unknown"
    return {
        "mcserve": mcserve,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "threads": torch.get_num_threads(),
    }


@functools.cache
def _software_json() -> str:
    return dumps(software())


_POLICIES: dict[int, tuple[Any, dict[str, Any]]] = {}


def _policy(model: ServedModel) -> dict[str, Any]:
    """The referral policy as JSON values, dumped once per policy object (not per record)."""
    policy = model.calibrator.policy
    cached = _POLICIES.get(id(policy))
    if cached is None or cached[0] is not policy:
        if len(_POLICIES) > 256:  # policies of unloaded models
            _POLICIES.clear()
        cached = _POLICIES[id(policy)] = (policy, policy.model_dump(mode="json"))
    return cached[1]


@functools.cache
def replica() -> str:
    return socket.gethostname()


def prediction_row(e: PredictionEvent, mode: InputsMode, key: bytes | None) -> dict[str, Any]:
    pred, p, m = e.prediction, e.params, e.model
    # The decision per input (the reasons, in words, are in the summary already).
    refs = (
        [
            {"refer": r["refer"], "triggers": r["triggers"]} if r is not None else None
            for r in referrals(pred.referral, int(e.x.shape[0]))
        ]
        if pred.referral is not None
        else None
    )
    params = {
        "samples": p.samples,
        "confidence": list(p.confidence),
        "seed": pred.seed,  # the seed used: given by the client, or drawn and reported
        "seed_given": p.seed is not None,
        "mode": p.mode,
        "interval": p.interval,
        # The effective referral policy (the manifest's, with the operator's overrides): the
        # referral decision in the summary depends on it, so a replay applies the same.
        "referral_policy": _policy(m),
    }
    if mode != "store" and key is None:
        raise ValueError("audit_inputs='hmac' needs a key (setting audit_hmac_key)")
    inputs = encode_inputs(e.x) if mode == "store" else None
    return {
        "recorded_at": utc(e.at),
        "request_id": e.request_id,
        "route": e.route,
        "caller": e.caller,
        "model": m.name,
        "version": m.version,
        "digest": m.digest,
        "backend": pred.backend,
        "device": pred.device,
        "mode": pred.mode,
        "samples": pred.samples,
        "seed": pred.seed,
        "params": dumps(params),
        "n_inputs": int(e.x.shape[0]),
        "inputs": inputs[0] if inputs else None,
        "inputs_layout": inputs[1] if inputs else None,
        "inputs_hmac": inputs_hmac(key, e.x) if key is not None else None,
        "inputs_key_id": key_id(key) if key is not None else None,
        "summary": summary_json(m, pred),
        "referral": dumps(refs) if refs is not None else None,
        "referred": any(r is not None and r["refer"] for r in refs) if refs is not None else None,
        "card_uuid": e.card_uuid,
        "software": _software_json(),
        "replica": replica(),
    }


def feedback_row(e: FeedbackEvent) -> dict[str, Any]:
    return {
        "recorded_at": utc(e.at),
        "card_uuid": e.card_uuid,
        "outcome": e.outcome,
        "override_reason": dumps(e.override_reason) if e.override_reason is not None else None,
        "outcome_timestamp": e.outcome_timestamp,
        "service_id": e.service_id,
        "request_id": e.request_id,
        "caller": e.caller,
        "replica": replica(),
    }


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
