"""How far a replay's answer is from the recorded one: the JSON paths that differ, and the size
of the difference (float rounding only, or beyond), with the replaying machine named; and the
record's columns derived from its answer, checked against that answer (`derived`)."""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import torch

from service.audit.rows import AuditRecord, referral_of
from service.audit.seal import is_sealed

MAX_DIFFERENCES = 20
# Relative size of a difference that float rounding explains. Measured (2026-12-06, bundled
# models, AMD EPYC): the same seeded request under other CPU kernels (MKL's SSE2 path, ATen
# without vectors, oneDNN SSE4.1) moved samples by at most 3.3e-7 of the largest sample and
# means and standard deviations by at most 2.5e-7 relative; CUDA against CPU 2.4e-6 absolute.
ROUNDING_RTOL = 1e-5


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


# The answer's own fields that the record's columns copy (record.message: both from the same
# Prediction): column -> its path in the answer's JSON.
ANSWERED = {
    "model": ("model", "name"),
    "version": ("model", "version"),
    "digest": ("model", "digest"),
    "backend": ("backend",),
    "device": ("device",),
    "mode": ("mode",),
    "samples": ("samples",),
    "seed": ("seed",),
}
_ABSENT = object()  # a field the stored answer lacks


def derived(record: AuditRecord) -> list[str]:
    """The columns made from the answer when it was recorded (rows.prediction_row: `referral`,
    `referred`, `n_inputs`, and the model version, backend, device, mode, samples and seed that
    the answer names too), made again from the stored answer and compared with the stored
    columns. Queries read these in clear, and a replay's verdict names them; the database
    owner could change them and leave the answer alone, which the answer's own comparison
    would not see. A sealed answer (not opened: seal.reveal) gives only that the seed is not
    kept in clear beside it."""
    if is_sealed(record.summary):
        clear = {"seed": record.seed, "params.seed": record.params.get("seed")}
        return [
            f"column {c}: stored {orjson.dumps(v).decode()}, but the seed of a sealed answer "
            "is kept only sealed (null in clear)"
            for c, v in clear.items()
            if v is not None
        ]
    try:
        doc = orjson.loads(record.summary)
        n = len(doc["predictions"])
        referral, referred = referral_of(record.summary.encode())
    except (orjson.JSONDecodeError, TypeError, KeyError, AttributeError):
        return []  # the answer's own comparison says what is wrong with it
    made: dict[str, Any] = {
        "referral": orjson.loads(referral) if referral is not None else None,
        "referred": referred,
        "n_inputs": n,
    }
    for column, path in ANSWERED.items():
        value: Any = doc
        for key in path:  # an answer without the field (an older form) cannot check it
            value = value.get(key, _ABSENT) if isinstance(value, dict) else _ABSENT
        if value is not _ABSENT:
            made[column] = value
    stored = {c: getattr(record, c) for c in made}
    return [
        f"column {c}: stored {orjson.dumps(stored[c]).decode()}, the answer gives "
        f"{orjson.dumps(made[c]).decode()}"
        for c in made
        if stored[c] != made[c] or type(stored[c]) is not type(made[c])
    ]
