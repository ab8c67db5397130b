"""Replay a recorded prediction and say whether it is bit-identical.

The recorded bundle version is loaded from the model repository (its digest must match the
record's: bundle versions are immutable), on the recorded device with the recorded thread
count, with the recorded parameters, seed and effective referral policy. The recomputed summary
JSON is compared byte for byte with the stored one; differences are listed by JSON path, with
their size: where only floats differ and by no more than float rounding (`ROUNDING_RTOL`), the
replaying machine's kernels are the likely cause (another CPU, library build or thread count:
docs/RANDOM_NUMBERS.md says what is bit-identical where), and the result says so; anything else
is a difference in values. The columns made from the answer (`referral`, `referred`,
`n_inputs`, and the model version, backend, device, mode, samples and seed it names) are checked
against the stored answer too (compare.derived): a mismatch is a difference, named by its column.

With only an HMAC of the inputs stored, the caller supplies the inputs and they are checked
against the HMAC (with the same key) before anything is computed (inputs.py); the answer and
seed of such a record are sealed under that key (seal.py) and opened with it. A `samples: auto`
answer is replayed adaptively with its recorded settings, a text model's with its per-text
notes (inputs.input_notes): both are part of the answer the client got.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import torch

from service.audit.compare import MAX_DIFFERENCES, Size, derived, differences, size
from service.audit.inputs import (
    ReplayError,
    Supplied,
    as_recorded,
    check_inputs,
    input_notes,
    read_inputs,
    the_key,
)
from service.audit.record import software, summary_json
from service.audit.rows import AuditRecord
from service.audit.seal import SealError, is_sealed, reveal
from service.bundle.load import TrustPolicy, load_bundle
from service.engine import adaptive
from service.engine.model import Prediction, ServedModel
from service.engine.params import PredictParams
from service.engine.registry import discover


@dataclass
class ReplayResult:
    record: AuditRecord
    identical: bool
    recomputed: str  # the recomputed summary JSON
    differences: list[str] = field(default_factory=list)  # "path: stored X, recomputed Y"
    notes: list[str] = field(default_factory=list)  # e.g. software that differs from the record
    size: Size | None = None  # how far the recomputed numbers are from the stored ones


def find_bundle(record: AuditRecord, model_dir: Path, policy: TrustPolicy) -> Path:
    """The directory of the recorded model version, verified, with the recorded digest."""
    seen = []
    for name, version, path in discover(model_dir):
        if name != record.model or version not in (record.version, None):
            continue
        bundle = load_bundle(path, policy)
        seen.append(f"{path} (version {bundle.manifest.version}, {bundle.digest})")
        if bundle.manifest.version != record.version:
            continue
        if bundle.digest != record.digest:
            raise ReplayError(
                f"{path} is {record.model} version {record.version} with digest {bundle.digest}, "
                f"but the record says {record.digest}: bundle versions are immutable, so this is "
                "not the bundle that answered; restore the original"
            )
        return path
    raise ReplayError(
        f"model '{record.model}' version '{record.version}' is not in {model_dir}"
        + (f"; found {', '.join(seen)}" if seen else "")
        + " (--model-dir names the repository)"
    )


def opened(record: AuditRecord, key: bytes | None) -> AuditRecord:
    """The record with its answer and seed readable: an HMAC-only record keeps them sealed
    under the key (seal.py); other records are returned as they are."""
    if not is_sealed(record.summary):
        return record
    key = the_key(record, key, "an HMAC of its inputs and a sealed answer")
    try:
        return reveal(record, key)
    except SealError as exc:
        raise ReplayError(str(exc)) from exc


def _device(record: AuditRecord) -> str:
    device = record.device.split(" ")[0]  # "cuda:0 (NVIDIA H100 ...)" -> "cuda:0"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ReplayError(
            f"the prediction ran on {record.device}; this machine has no CUDA device, and a "
            "replay is bit-identical only on the same backend and device"
        )
    return device


def replay(
    record: AuditRecord,
    model_dir: Path,
    *,
    inputs: np.ndarray | Path | None = None,
    hmac_key: bytes | None = None,
    policy: TrustPolicy | None = None,
) -> ReplayResult:
    """Recompute `record`; `inputs` (an array or a JSON file) when only an HMAC is stored."""
    policy = policy or TrustPolicy()
    record = opened(record, hmac_key)
    path = find_bundle(record, model_dir, policy)
    threads = int(record.software.get("threads") or torch.get_num_threads())
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # thread count can change a float's last bit
    try:
        return _replay(record, path, threads, inputs, hmac_key, policy)
    finally:
        torch.set_num_threads(before)


def _replay(
    record: AuditRecord,
    path: Path,
    threads: int,
    inputs: np.ndarray | Path | None,
    hmac_key: bytes | None,
    policy: TrustPolicy,
) -> ReplayResult:
    p = record.params
    model = ServedModel(
        load_bundle(path, policy),
        device=_device(record),
        onnx_threads=threads,
        referral_overrides={record.model: p["referral_policy"]} if "referral_policy" in p else None,
    )
    supplied = read_inputs(inputs, model) if isinstance(inputs, Path) else None
    if isinstance(inputs, np.ndarray):
        supplied = Supplied(inputs)
    legacy_cut = False
    if supplied is not None:
        x = supplied.x
        try:
            check_inputs(record, x, hmac_key)
        except ReplayError:
            if supplied.legacy is None:
                raise
            check_inputs(record, supplied.legacy, hmac_key)  # the same error if not these either
            x, legacy_cut = supplied.legacy, True
    else:
        stored = record.inputs
        if stored is None:
            raise ReplayError(
                "the record holds only an HMAC of its inputs: supply them (--inputs FILE, the "
                "request's instances as JSON); they are checked against the HMAC first"
            )
        x = stored
    pred = _predict(model, x, p, record.summary)
    pred.warnings.extend(p.get("adapter_warnings") or ())  # e.g. parameters /v1 ignored
    # A text model's answer carries per-text notes (tokens, truncated) beside the numbers.
    notes = as_recorded(model, supplied.notes, record.summary) if supplied is not None else None
    pred.input_notes = notes if notes is not None else input_notes(model, x, record.summary)
    recomputed = summary_json(model, pred)
    columns = derived(record)  # the columns as the stored answer gives them
    result = ReplayResult(record, recomputed == record.summary and not columns, recomputed)
    if recomputed != record.summary:
        try:
            stored_doc = orjson.loads(record.summary)
        except orjson.JSONDecodeError:
            result.differences = ["$: the stored summary is not valid JSON"]
        else:
            recomputed_doc = orjson.loads(recomputed)
            found = differences(stored_doc, recomputed_doc)
            result.size = size(stored_doc, recomputed_doc)
            result.differences = found[:MAX_DIFFERENCES] or ["$: the JSON text differs"]
            if len(found) > MAX_DIFFERENCES:
                result.differences.append(f"... and {len(found) - MAX_DIFFERENCES} more")
    result.differences += columns
    if legacy_cut:
        result.notes.append(
            "the texts were tokenized as the server did before 2026-12-07 (a long text cut at "
            "max_tokens without its tokenizer template's closing tokens): the record's inputs"
        )
    here = software() | {"threads": threads}
    for k in [*record.software, *(k for k in here if k not in record.software)]:
        if here.get(k) != record.software.get(k):  # also keys one side lacks (older records)
            result.notes.append(f"{k}: recorded {record.software.get(k)}, here {here.get(k)}")
    return result


def _predict(model: ServedModel, x: np.ndarray, p: dict[str, Any], stored: str = "") -> Prediction:
    """The recorded parameters applied. `samples: auto` (params["auto"]) replays at the passes
    it used, as a fixed request marked adaptive: the same bits, since masks are a function of
    seed and pass. Deciding again when to stop tied a replay to today's stopping rule, and the
    rule changed (2026-12-07: a classifier starts at its default passes): records answered
    before replayed DIFFERENT (review R11). A record from before its settings were kept reads
    them from its stored answer's warning (`stored`; review R12)."""
    params = PredictParams(
        samples=int(p["samples"]),
        confidence=tuple(float(c) for c in p["confidence"]),
        seed=p["seed"],
        mode=p["mode"],
        interval=p["interval"],
        dropout_sites=p.get("dropout_sites"),  # absent in older records: the model's default
    )
    auto = p.get("auto")
    said = _ADAPTIVE.search(stored) if auto is None else None
    if said is not None:  # before 2026-12-07 the settings were in the answer's warning only
        auto = {"max_samples": int(said[1]), "tolerance": float(said[2]), "first": 2}
    if auto is None or params.mode != "mc":
        return model.predict(x, params)
    return adaptive.mark(model.predict(x, params), adaptive.Adaptive(**auto))


# adaptive.mark's warning: the settings of an auto record from before they were kept apart.
_ADAPTIVE = re.compile(r"adaptive passes: \d+ used \(max_samples (\d+), tolerance ([0-9.eE+-]+)\)")
