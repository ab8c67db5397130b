"""What a replay computes on: the record's inputs, or the ones supplied for an HMAC-only record
(checked against its HMAC with the key that made it), and, for a text model, the per-text
tokenization notes the answer carried (`tokens`, `truncated`); for an audio model, the per-clip
`seconds`, `sample_rate` and `truncated`, computed again from supplied clips, else read from the
recorded answer (a clip's length is not in its features).

The notes are part of the recorded answer but not of the engine's computation: a replay of
supplied texts tokenizes them again; a replay of stored token ids counts the ids before each
row's padding (arrays.lengths), which is the count the answer gave unless the text was cut at
the model's max_tokens, when the count before the cut is not in the ids and is read from the
recorded answer (only where that says the text was cut and its row is full).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from service.audit.arrays import inputs_hmac, key_id, lengths
from service.audit.rows import AuditRecord
from service.engine.instances import encode_instances
from service.engine.model import ServedModel
from service.engine.text import encode_texts
from service.errors import McServeError

Notes = list[dict[str, Any]]


class ReplayError(McServeError):
    """The record cannot be replayed here (bundle, device, inputs or key missing or wrong)."""

    code = "invalid_input"


@dataclass(frozen=True)
class Supplied:
    """Inputs given for a replay: the engine's array, and a text model's notes when known."""

    x: np.ndarray
    notes: Notes | None = None
    # A text model's ids as the server cut long texts before 2026-12-07 (without keeping the
    # tokenizer template's closing tokens), where that differs: its records' HMACs are of these.
    legacy: np.ndarray | None = None


def read_inputs(path: Path, model: ServedModel) -> Supplied:
    """Inputs from a JSON file: the request's instances, as a list or as {"instances": [...]};
    a text model's texts are tokenized as the server did (token ids and notes); an audio model's
    clips ({"b64": ...}, or /v2's base64 strings, flat or nested) are featurised again."""
    try:
        value = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise ReplayError(f"cannot read inputs from {path}: {exc}") from exc
    instances = value.get("instances") if isinstance(value, dict) else value
    if not isinstance(instances, list):
        raise ReplayError(f"{path}: expected a JSON list of instances or {{'instances': [...]}}")
    spec = model.manifest.inputs
    if spec.text is not None:
        n = max(1, len(instances))
        batch = encode_texts(instances, model.bundle.tokenizer, spec.text, n)
        legacy = None
        if any(batch.truncated):
            old = encode_texts(instances, model.bundle.tokenizer, spec.text, n, plain_cut=True)
            legacy = None if np.array_equal(old.ids, batch.ids) else old.ids
        return Supplied(batch.ids, batch.notes(), legacy)
    if spec.audio is not None:  # a /v2 client's clips are bare base64 strings: /v1's form
        instances = [_b64_form(v) for v in instances]
    encoded = encode_instances(instances, model, max(1, len(instances)))  # clips: features again
    return Supplied(encoded.x, encoded.notes)


def the_key(record: AuditRecord, key: bytes | None, what: str) -> bytes:
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


def check_inputs(record: AuditRecord, x: np.ndarray, key: bytes | None) -> None:
    """Supplied inputs must match the record's HMAC (or its stored inputs)."""
    stored = record.inputs
    if stored is not None:
        if stored.shape != x.shape or stored.tobytes() != x.astype(stored.dtype).tobytes():
            raise ReplayError("the supplied inputs differ from the inputs stored in the record")
        return
    if record.inputs_hmac is None:
        raise ReplayError("the record holds neither inputs nor their HMAC")
    key = the_key(record, key, "an HMAC of its inputs")
    if not hmac.compare_digest(inputs_hmac(key, x), record.inputs_hmac):
        raise ReplayError(
            "the supplied inputs do not match the record's HMAC: they are not the inputs of this "
            "prediction (check the order of instances and every value)"
        )


def input_notes(model: ServedModel, x: np.ndarray, summary: str) -> Notes | None:
    """A text model's notes rebuilt from its token ids, an audio model's read from the recorded
    answer (see the module's docstring); None for other models. `summary`: the recorded
    answer, in clear."""
    text = model.manifest.inputs.text
    if model.manifest.inputs.audio is not None:  # the clip's length is not in its features
        rows = _recorded_notes(summary, x.shape[0])
        # sample_rate only where the answer gave it (those after 2026-12-07); seconds and
        # truncated always, so a record that lost them is a difference (review N).
        return [
            {"seconds": row.get("seconds"), "truncated": row.get("truncated")}
            | ({"sample_rate": row["sample_rate"]} if "sample_rate" in row else {})
            for row in rows
        ]
    if text is None or x.ndim != 2:
        return None
    recorded = _recorded_notes(summary, x.shape[0])
    notes: Notes = []
    for n, said in zip(lengths(x, text.pad_id).tolist(), recorded, strict=True):
        before = said.get("tokens")
        cut = said.get("truncated") is True and isinstance(before, int) and before > n
        if cut and n == x.shape[1]:
            notes.append({"tokens": before, "truncated": True})
        else:
            notes.append({"tokens": n, "truncated": False})
    return notes


def as_recorded(model: ServedModel, notes: Notes | None, summary: str) -> Notes | None:
    """An audio model's notes of supplied clips without `sample_rate` where its recorded answer
    has none (an answer from before 2026-12-07: the replay of its clips called that a
    difference, review L); every other key stays, so a record that lost one differs."""
    if notes is None or model.manifest.inputs.audio is None:
        return notes
    rows = _recorded_notes(summary, len(notes))
    return [
        {k: v for k, v in n.items() if k != "sample_rate" or "sample_rate" in r or not r}
        for n, r in zip(notes, rows, strict=True)
    ]


def _recorded_notes(summary: str, n: int) -> list[dict[str, Any]]:
    """Per input, the recorded answer's prediction (empty where it cannot be read)."""
    try:
        rows = orjson.loads(summary)["predictions"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        rows = []
    if not isinstance(rows, list):
        rows = []
    rows = [r if isinstance(r, dict) else {} for r in rows[:n]]
    return rows + [{}] * (n - len(rows))


def _b64_form(v: Any) -> Any:
    """/v1's {"b64": ...} of a /v2 client's clip: a bare base64 string, or one in a list of one
    (a [B, 1] tensor's nested data)."""
    if isinstance(v, list) and len(v) == 1 and isinstance(v[0], str):
        v = v[0]
    return {"b64": v} if isinstance(v, str) else v
