"""Replay a recorded prediction and say whether it is bit-identical.

The recorded bundle version is loaded from the model repository (its digest must match the
record's: bundle versions are immutable), on the recorded device with the recorded thread
count, with the recorded parameters, seed and effective referral policy. The recomputed summary
JSON is compared byte for byte with the stored one; differences are listed by JSON path, with
their size: where only floats differ and by no more than float rounding (`ROUNDING_RTOL`), the
replaying machine's kernels are the likely cause (another CPU, library build or thread count:
docs/RANDOM_NUMBERS.md says what is bit-identical where), and the result says so; anything else
is a difference in values.

With only an HMAC of the inputs stored, the caller supplies the inputs and they are checked
against the HMAC (with the same key) before anything is computed; the answer and seed of such a
record are sealed under that key (seal.py) and opened with it.
"""

from __future__ import annotations

import hmac
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import torch

from service.audit.record import software, summary_json
from service.audit.rows import AuditRecord, inputs_hmac, key_id
from service.audit.seal import SealError, is_sealed, reveal
from service.bundle.load import TrustPolicy, load_bundle
from service.engine.inputs import to_array
from service.engine.model import ServedModel
from service.engine.params import PredictParams
from service.engine.registry import discover
from service.errors import McServeError

MAX_DIFFERENCES = 20
# Relative size of a difference that float rounding explains. Measured (2026-12-06, bundled
# models, AMD EPYC): the same seeded request under other CPU kernels (MKL's SSE2 path, ATen
# without vectors, oneDNN SSE4.1) moved samples by at most 3.3e-7 of the largest sample and
# means and standard deviations by at most 2.5e-7 relative; CUDA against CPU 2.4e-6 absolute.
ROUNDING_RTOL = 1e-5


class ReplayError(McServeError):
    """The record cannot be replayed here (bundle, device, inputs or key missing or wrong)."""

    code = "invalid_input"


@dataclass
class ReplayResult:
    record: AuditRecord
    identical: bool
    recomputed: str  # the recomputed summary JSON
    differences: list[str] = field(default_factory=list)  # "path: stored X, recomputed Y"
    notes: list[str] = field(default_factory=list)  # e.g. software that differs from the record
    size: Size | None = None  # how far the recomputed numbers are from the stored ones


@dataclass(frozen=True)
class Size:
    """The size of a replay's differences."""

    numbers: int  # floats that differ
    largest: float  # largest absolute difference among them
    relative: float  # largest |a - b| / max(|a|, |b|)
    other: int  # differing values that are not floats (labels, counts, flags, structure)

    @property
    def rounding_only(self) -> bool:
        return self.other == 0 and self.relative <= ROUNDING_RTOL

    def describe(self) -> str:
        if self.numbers:
            text = (
                f"{self.numbers} numbers differ, by at most {self.largest:.3g} "
                f"(relative {self.relative:.3g})"
            )
        else:
            text = "no number differs"
        if self.other:
            text += f"; {self.other} other values differ"
        if self.rounding_only:
            return (
                f"{text}: float rounding only (relative tolerance {ROUNDING_RTOL:g}), as another "
                f"CPU, library build or thread count gives; replayed on {machine()}"
            )
        return f"{text}: beyond float rounding, not explained by the machine"


def machine() -> str:
    """This machine's CPU and the kernels torch dispatches on it, for a replay's report."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} (torch {torch.backends.cpu.get_cpu_capability()})"


def size(stored: Any, recomputed: Any) -> Size:
    """How far two parsed documents are apart (see `Size`)."""
    numbers = other = 0
    largest = relative = 0.0
    for a, b in _differing_leaves(stored, recomputed):
        if isinstance(a, float) and isinstance(b, float):
            numbers += 1
            gap = abs(a - b)
            largest = max(largest, gap)
            relative = max(relative, gap / max(abs(a), abs(b)))
        else:
            other += 1
    return Size(numbers, largest, relative, other)


def _differing_leaves(stored: Any, recomputed: Any) -> list[tuple[Any, Any]]:
    if isinstance(stored, dict) and isinstance(recomputed, dict):
        out = []
        for k in stored.keys() | recomputed.keys():
            if k not in recomputed or k not in stored:
                out.append((stored.get(k), recomputed.get(k)))
            else:
                out.extend(_differing_leaves(stored[k], recomputed[k]))
        return out
    if isinstance(stored, list) and isinstance(recomputed, list):
        if len(stored) != len(recomputed):
            return [(stored, recomputed)]
        return [p for a, b in zip(stored, recomputed, strict=True) for p in _differing_leaves(a, b)]
    same = type(stored) is type(recomputed) and stored == recomputed
    return [] if same else [(stored, recomputed)]


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


def read_inputs(path: Path, model: ServedModel) -> np.ndarray:
    """Inputs from a JSON file: the request's instances, as a list or as {"instances": [...]}."""
    try:
        value = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise ReplayError(f"cannot read inputs from {path}: {exc}") from exc
    instances = value.get("instances") if isinstance(value, dict) else value
    if not isinstance(instances, list):
        raise ReplayError(f"{path}: expected a JSON list of instances or {{'instances': [...]}}")
    return to_array(instances, model.manifest.inputs, max(1, len(instances)))


def _the_key(record: AuditRecord, key: bytes | None, what: str) -> bytes:
    """The key that made the record (HMAC-only records need it), or a ReplayError saying which."""
    if key is None:
        raise ReplayError(
            f"the record holds only {what}: set MCSERVE_AUDIT_HMAC_KEY to the key that made it "
            f"(key id {record.inputs_key_id})"
        )
    if record.inputs_key_id is not None and key_id(key) != record.inputs_key_id:
        raise ReplayError(
            f"the key given has id {key_id(key)}, the record was made with key id "
            f"{record.inputs_key_id}: use that key"
        )
    return key


def opened(record: AuditRecord, key: bytes | None) -> AuditRecord:
    """The record with its answer and seed readable: an HMAC-only record keeps them sealed
    under the key (seal.py); other records are returned as they are."""
    if not is_sealed(record.summary):
        return record
    key = _the_key(record, key, "an HMAC of its inputs and a sealed answer")
    try:
        return reveal(record, key)
    except SealError as exc:
        raise ReplayError(str(exc)) from exc


def check_inputs(record: AuditRecord, x: np.ndarray, key: bytes | None) -> None:
    """Supplied inputs must match the record's HMAC (or its stored inputs)."""
    stored = record.inputs
    if stored is not None:
        if stored.shape != x.shape or stored.tobytes() != x.astype(stored.dtype).tobytes():
            raise ReplayError("the supplied inputs differ from the inputs stored in the record")
        return
    if record.inputs_hmac is None:
        raise ReplayError("the record holds neither inputs nor their HMAC")
    key = _the_key(record, key, "an HMAC of its inputs")
    if not hmac.compare_digest(inputs_hmac(key, x), record.inputs_hmac):
        raise ReplayError(
            "the supplied inputs do not match the record's HMAC: they are not the inputs of this "
            "prediction (check the order of instances and every value)"
        )


def differences(stored: Any, recomputed: Any, path: str = "$") -> list[str]:
    """JSON paths where two parsed documents differ (floats compared exactly)."""
    if isinstance(stored, dict) and isinstance(recomputed, dict):
        out = []
        for k in list(stored) + [k for k in recomputed if k not in stored]:
            if k not in recomputed or k not in stored:
                out.append(f"{path}.{k}: present in only one")
            else:
                out.extend(differences(stored[k], recomputed[k], f"{path}.{k}"))
        return out
    if isinstance(stored, list) and isinstance(recomputed, list):
        if len(stored) != len(recomputed):
            return [f"{path}: {len(stored)} items stored, {len(recomputed)} recomputed"]
        out = []
        for i, (a, b) in enumerate(zip(stored, recomputed, strict=True)):
            out.extend(differences(a, b, f"{path}[{i}]"))
        return out
    same = type(stored) is type(recomputed) and stored == recomputed
    return [] if same else [f"{path}: stored {stored!r}, recomputed {recomputed!r}"]


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
    if isinstance(inputs, Path):
        inputs = read_inputs(inputs, model)
    if inputs is not None:
        check_inputs(record, inputs, hmac_key)
        x = inputs
    else:
        stored = record.inputs
        if stored is None:
            raise ReplayError(
                "the record holds only an HMAC of its inputs: supply them (--inputs FILE, the "
                "request's instances as JSON); they are checked against the HMAC first"
            )
        x = stored
    params = PredictParams(
        samples=int(p["samples"]),
        confidence=tuple(float(c) for c in p["confidence"]),
        seed=p["seed"],
        mode=p["mode"],
        interval=p["interval"],
        dropout_sites=p.get("dropout_sites"),  # absent in older records: the model's default
    )
    recomputed = summary_json(model, model.predict(x, params))
    result = ReplayResult(record, recomputed == record.summary, recomputed)
    if not result.identical:
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
    here = software() | {"threads": threads}
    for k in [*record.software, *(k for k in here if k not in record.software)]:
        if here.get(k) != record.software.get(k):  # also keys one side lacks (older records)
            result.notes.append(f"{k}: recorded {record.software.get(k)}, here {here.get(k)}")
    return result
