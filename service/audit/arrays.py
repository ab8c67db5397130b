"""An input array as the audit trail keeps it: little-endian bytes and a `{"dtype", "shape"}`
layout, and, for a text model's token ids, only the ids before each row's padding.

Why the padding is left out: a text model's input is [texts, max_tokens] int64, every text
padded to max_tokens (900 for the bundled model). 1,024 three-token texts were stored as 7.4 MB
for a 5 kB request; without the padding they are 24 kB. The layout then names the pad id and
each row's length, which rebuild the engine's array exactly (`decode_inputs`). The HMAC is still
of the engine's array (`engine_form`): the same numbers give the same digest however stored.
Torch-free: the writer process and the CLI use it.
"""

from __future__ import annotations

import hashlib
import hmac
import sys
from typing import Any

import numpy as np
import orjson

HMAC_PREFIX = "hmac-sha256:"
_HMAC_DOMAIN = b"mcserve-audit-inputs-v1\0"


def dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def layout(dtype: np.dtype[Any], shape: tuple[int, ...]) -> str:
    """`{"dtype", "shape"}` of an input array: stored beside its bytes, and the HMAC's header."""
    return dumps({"dtype": dtype.newbyteorder("=").name, "shape": list(shape)})


def little_endian(x: np.ndarray) -> np.ndarray:
    if x.dtype.byteorder == ">" or (x.dtype.byteorder == "=" and sys.byteorder == "big"):
        return np.ascontiguousarray(x, dtype=x.dtype.newbyteorder("<"))
    return np.ascontiguousarray(x)


def lengths(x: np.ndarray, pad: int) -> np.ndarray:
    """Per row of a 2-D array, how many values come before its trailing run of `pad`."""
    content = x != pad
    width = x.shape[1]
    last = width - np.argmax(content[:, ::-1], axis=1)  # one past the last non-pad value
    return np.where(content.any(axis=1), last, 0).astype(np.int64)


def compact(x: np.ndarray, pad: int) -> tuple[bytes, str]:
    """Token ids [B, L] without each row's trailing padding: (bytes, layout with pad and
    lengths). `decode_inputs` rebuilds `x` from them, bit for bit."""
    a = little_endian(x)
    n = lengths(a, pad)
    kept = a[np.arange(a.shape[1]) < n[:, None]]  # row by row, the ids before the padding
    spec = {
        "dtype": a.dtype.newbyteorder("=").name,
        "shape": list(a.shape),
        "pad": int(pad),
        "lengths": n.tolist(),
    }
    return kept.tobytes(), dumps(spec)


def decode_inputs(data: bytes, layout_json: str) -> np.ndarray:
    """The engine's input array from its stored bytes and layout (padded again if compacted)."""
    spec = orjson.loads(layout_json)
    dtype = np.dtype(spec["dtype"])
    values = np.frombuffer(bytes(data), dtype=dtype.newbyteorder("<")).astype(dtype)
    if "lengths" not in spec:
        return values.reshape(spec["shape"])
    out = np.full(spec["shape"], spec["pad"], dtype=dtype)
    n = np.asarray(spec["lengths"], dtype=np.int64)
    out[np.arange(out.shape[1]) < n[:, None]] = values
    return out


def engine_form(data: bytes, layout_json: str) -> tuple[bytes, str]:
    """(little-endian bytes, plain layout) of the engine's array, whichever way it is stored."""
    if '"lengths"' not in layout_json:
        return data, layout_json
    x = little_endian(decode_inputs(data, layout_json))
    return x.tobytes(), layout(x.dtype, x.shape)


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
