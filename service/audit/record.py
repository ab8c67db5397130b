"""What the request path hands the audit trail, and the compact message it becomes.

The request path describes its prediction as a `PredictionEvent` (the model, the input array,
the parameters and the engine's `Prediction`); the writer turns it at once into a `message`: a
tuple of plain values, the input array's bytes and the answer's JSON bytes, which the writer
process (`sink.py`) turns into a row (`rows.py`) and stores. The summary is the native answer's
JSON for that prediction (`service.encode.response`), whatever the route: the numbers the
client got, in one canonical form that a replay can recompute and compare byte for byte.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import platform
import socket
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from service.audit.arrays import compact, layout, little_endian
from service.audit.rows import FeedbackMessage, Message, PredictionMessage
from service.encode import response_json
from service.engine.model import Prediction, ServedModel
from service.engine.params import PredictParams
from service.engine.sampler import NUMERICS


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
    # The answer's warnings the adapter added, not the engine (e.g. parameters it ignored).
    adapter_warnings: list[str] | None = None
    # How the client got the answer when not as the native JSON `summary` holds (/v1 as FHIR:
    # {"media_type", "fhir_version", "subject"}), for `params.representation`.
    representation: dict[str, str] | None = None


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


Event = PredictionEvent | FeedbackEvent


def encode_inputs(x: np.ndarray, pad: int | None = None) -> tuple[bytes, str]:
    """The input array's bytes (little-endian: exact, and a fifth of its JSON) and its layout;
    a text model's token ids (`pad`: its pad id) without their padding (arrays.compact)."""
    if pad is not None and x.ndim == 2 and x.dtype.kind in "iu":
        return compact(x, pad)
    a = little_endian(x)
    return a.tobytes(), _layout(a.dtype, a.shape)


@functools.lru_cache(maxsize=256)
def _layout(dtype: np.dtype[Any], shape: tuple[int, ...]) -> str:
    # Cached: numpy's dtype.name alone cost 3.5 us per record on the audit thread.
    return layout(dtype, shape)


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
        "engine_numerics": NUMERICS,  # service/engine/sampler.py: bumped when rounding changes
    }


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


def message(e: Event) -> Message:
    """The event as plain values for the writer process (`rows.prediction_row` reads it).

    Runs on the event loop, once per answered prediction: only what needs the engine's objects
    happens here (the answer's JSON is usually encoded already, for the reply); the rows are built
    in the writer process.
    """
    if isinstance(e, FeedbackEvent):
        return FeedbackMessage(
            e.at,
            e.card_uuid,
            e.outcome,
            e.override_reason,
            e.outcome_timestamp,
            e.service_id,
            e.request_id,
            e.caller,
        )
    pred, p, m = e.prediction, e.params, e.model
    params = {
        "samples": pred.samples if pred.samples is not None else p.samples,  # auto: used
        "confidence": list(p.confidence),
        "seed": pred.seed,  # the seed used: given by the client, or drawn and reported
        "seed_given": p.seed is not None,
        "mode": p.mode,
        "interval": p.interval,
        # The dropout sites sampled ("all" or the last k): a replay samples the same.
        "dropout_sites": "all" if pred.dropout_sites is None else pred.dropout_sites,
        # The effective referral policy (the manifest's, with the operator's overrides): the
        # referral decision in the summary depends on it, so a replay applies the same.
        "referral_policy": _policy(m),
    }
    if e.adapter_warnings:  # in the answer; a replay cannot know them from the engine
        params["adapter_warnings"] = list(e.adapter_warnings)
    if e.representation is not None:  # another form of these numbers (FHIR, for a subject)
        params["representation"] = dict(e.representation)
    if p.auto is not None:  # samples=auto: a replay decides when to stop as this answer did
        params["auto"] = dataclasses.asdict(p.auto)  # max_samples, tolerance, first
    text = m.manifest.inputs.text
    data, layout_json = encode_inputs(e.x, text.pad_id if text is not None else None)
    return PredictionMessage(e.at, e.request_id, e.route, e.caller, m.name, m.version, m.digest,
                             pred.backend, pred.device, pred.mode, pred.samples, pred.seed, params,
                             int(e.x.shape[0]), data, layout_json, response_json(m, pred),
                             e.card_uuid)  # fmt: skip
