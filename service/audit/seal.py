"""Sealing what an HMAC-only record keeps of its answer (`MCSERVE_AUDIT_INPUTS=hmac`).

The answer and the seed are a fingerprint of the inputs: with the public bundle, anyone who can
read the record could recompute the prediction for a guessed input and compare it bit for bit
with a stored summary, needing no key. So in hmac mode they are stored only encrypted and
authenticated (AES-256-GCM) under a key derived from the HMAC key, bound to the record's input
HMAC, request id and model version (a sealed answer cannot be moved to a record of other
inputs, request or version unnoticed; two records sharing all of them, a retry with the same
request id, can exchange theirs). Whoever holds the key (a replay, `audit show`) reads them
back exactly; whoever does not learns nothing from them.

Stored form: `sealed-v1:` + base64(nonce[12] + ciphertext + tag[16]) of the JSON
`{"seed": ..., "summary": "<the answer's JSON text>"}`.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import hmac
import os
from typing import TYPE_CHECKING

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

if TYPE_CHECKING:
    from service.audit.rows import AuditRecord

SEALED_PREFIX = "sealed-v1:"
_KEY_DOMAIN = b"mcserve-audit-seal-v1"  # the AES key is not the HMAC key itself


class SealError(ValueError):
    """A sealed answer that cannot be opened: another key, or the stored text was changed."""


@functools.lru_cache(maxsize=4)  # one key per writer process (a few after a rotation)
def _aead(key: bytes) -> AESGCM:
    return AESGCM(hmac.new(key, _KEY_DOMAIN, hashlib.sha256).digest())


def is_sealed(summary: str) -> bool:
    return summary.startswith(SEALED_PREFIX)


def context(
    inputs_hmac: str, request_id: str | None, model: str, version: str, digest: str, mode: str
) -> str:
    """What a sealed answer is bound to: its record's inputs, request and model version, so that
    it cannot be moved to a record of other inputs, request or version unnoticed."""
    return orjson.dumps([inputs_hmac, request_id, model, version, digest, mode]).decode()


def seal(key: bytes, seed: int | None, summary: bytes, bound: str) -> str:
    """The stored text of an answer and its seed; `bound` (`context(...)`) is authenticated."""
    nonce = os.urandom(12)  # random per record: 2^-32 collision odds only after 2^32 records/key
    payload = orjson.dumps({"seed": seed, "summary": summary.decode()})
    blob = nonce + _aead(key).encrypt(nonce, payload, bound.encode())
    return SEALED_PREFIX + base64.b64encode(blob).decode()


def unseal(key: bytes, sealed: str, bound: str) -> tuple[int | None, str]:
    """(seed, summary JSON text) of a sealed answer; SealError when the key or text is wrong."""
    try:
        blob = base64.b64decode(sealed.removeprefix(SEALED_PREFIX), validate=True)
        payload = _aead(key).decrypt(blob[:12], blob[12:], bound.encode())
    except (ValueError, InvalidTag) as exc:
        raise SealError(
            "the record's sealed answer does not open with this key: it was made with another "
            "key, or the stored text was changed"
        ) from exc
    doc = orjson.loads(payload)
    return doc["seed"], doc["summary"]


def reveal(record: AuditRecord, key: bytes) -> AuditRecord:
    """The record with its answer and seed in clear (unchanged when nothing is sealed)."""
    if not is_sealed(record.summary):
        return record
    r = record
    bound = context(r.inputs_hmac or "", r.request_id, r.model, r.version, r.digest, r.mode)
    seed, summary = unseal(key, record.summary, bound)
    params = {**record.params, "seed": seed}
    return dataclasses.replace(record, summary=summary, seed=seed, params=params)
