"""Counter-based dropout masks: replayable, batch-independent and cheap.

A mask byte is a pure function of (seed, layer, pass, row, feature). We hash a 64-bit counter
with the SplitMix64 finaliser (Steele et al. 2014); every 64-bit word yields 8 mask bytes and a
byte `u` keeps its unit when `u < threshold`, with `threshold = round(256 * (1 - p))`. So:

* a request with a seed gets the same masks whatever else shares its forward pass or however the
  rows are chunked (the counter names the row inside the request, not inside the batch);
* the same integers can be computed by numpy (for onnxruntime, whose own Dropout keeps one
  generator per session) and on CUDA, so masks agree across backends and devices;
* the keep probability is quantised to 1/256 (within 2**-8 of the model's) and the inverted
  dropout scale uses the quantised value, so E[mask * scale] = 1 exactly.

Counter layout (documented in docs/RANDOM_NUMBERS.md): ``pass << 44 | row << 24 | word``;
the key of a layer is ``mix(seed + (layer + 1) * GAMMA)``; word = ``mix(key + counter * GAMMA)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from service.errors import InvalidInputError, ModelError

MASK64 = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15
MUL1 = 0xBF58476D1CE4E5B9
MUL2 = 0x94D049BB133111EB
PASS_SHIFT = 44
ROW_SHIFT = 24
MAX_PASSES = 1 << (64 - PASS_SHIFT)
MAX_ROWS = 1 << (PASS_SHIFT - ROW_SHIFT)
MAX_WORDS = 1 << ROW_SHIFT
MAX_SEED = (1 << 63) - 1


def _signed(v: int) -> int:
    """torch has no uint64 arithmetic: reinterpret as two's-complement int64."""
    v &= MASK64
    return v - (1 << 64) if v >= 1 << 63 else v


def mix64(z: int) -> int:
    """SplitMix64 finaliser on Python ints (the reference the tensor versions must match)."""
    z &= MASK64
    z = ((z ^ (z >> 30)) * MUL1) & MASK64
    z = ((z ^ (z >> 27)) * MUL2) & MASK64
    return z ^ (z >> 31)


def layer_key(seed: int, layer: int) -> int:
    if not 0 <= seed <= MAX_SEED:
        raise InvalidInputError(f"seed must be an integer in [0, 2**63 - 1], got {seed}")
    return mix64(seed + (layer + 1) * GAMMA)


def _srl(z: torch.Tensor, k: int) -> torch.Tensor:
    # torch's >> on int64 is arithmetic; mask the sign bits to get a logical shift.
    return (z >> k) & ((1 << (64 - k)) - 1)


def mix64_torch(z: torch.Tensor) -> torch.Tensor:
    """The finaliser on int64 tensors; multiplication wraps modulo 2**64 as on the CPU and GPU."""
    z = (z ^ _srl(z, 30)) * _signed(MUL1)
    z = (z ^ _srl(z, 27)) * _signed(MUL2)
    return z ^ _srl(z, 31)


def mix64_numpy(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.uint64, copy=False)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(MUL1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(MUL2)
    return z ^ (z >> np.uint64(31))


@dataclass(frozen=True)
class KeepRule:
    """Quantised keep probability of one dropout layer."""

    p: float  # the model's dropout rate

    @property
    def threshold(self) -> int:
        return round(256 * (1.0 - self.p))

    @property
    def keep_prob(self) -> float:
        return self.threshold / 256.0

    @property
    def scale(self) -> float:
        return 256.0 / self.threshold

    def validate(self, where: str) -> None:
        if not 0.0 < self.p < 1.0:
            raise ModelError(f"{where}: dropout rate must be in (0, 1), got {self.p}")
        if self.threshold < 1:
            raise ModelError(f"{where}: dropout rate {self.p} drops every unit once quantised")
        if self.threshold > 255:  # p < 1/512: the site never dropped anything, without a word
            raise ModelError(
                f"{where}: dropout rate {self.p} drops no unit once quantised to the masks' "
                "steps of 1/256; use p >= 0.002 (served as a multiple of 1/256) or remove it"
            )


def words_per_row(features: int) -> int:
    return (features + 7) // 8


def signed_key(seed: int, layer: int) -> int:
    return _signed(layer_key(seed, layer))


def counter_base(t: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    """The counter of word 0 for pass t and request row i (int64 tensors)."""
    if bool((i >= MAX_ROWS).any()) or bool((t >= MAX_PASSES).any()):
        raise InvalidInputError(f"at most {MAX_ROWS} inputs and {MAX_PASSES} passes per request")
    return (t << PASS_SHIFT) + (i << ROW_SHIFT)


def keep_bytes_rows(keys: torch.Tensor, base: torch.Tensor, features: int) -> torch.Tensor:
    """Mask bytes [rows, features] given each row's layer key and counter base (int64 [rows])."""
    if features > MAX_WORDS * 8:
        raise InvalidInputError(f"{features} features per row is over the mask counter's limit")
    words = words_per_row(features)
    ctr = base.unsqueeze(1) + torch.arange(words, dtype=torch.int64, device=base.device)
    z = ctr * _signed(GAMMA) + keys.unsqueeze(1)
    return mix64_torch(z).view(torch.uint8)[:, :features]


def keep_factors(u: torch.Tensor, threshold: int) -> torch.Tensor:
    """1.0 where a mask byte keeps its unit (`u < threshold`), else 0.0, as float32.

    Computed as clamp(threshold - u, 0, 1) on floats: exact for integer bytes, and measured 4x
    faster on CPU than `u < threshold`, whose bool output torch does not vectorise (145 us against
    about 40 us for 819k bytes), with a cheaper multiplication after it (float, not bool).
    """
    return torch.sub(threshold, u.to(torch.float32)).clamp_(0.0, 1.0)


def keep_bytes(
    seed: int,
    layer: int,
    b: int,
    row_start: int,
    row_stop: int,
    features: int,
    device: torch.device,
) -> torch.Tensor:
    """Mask bytes [row_stop - row_start, features] (uint8) for one request's rows.

    The reference for one request (the sampler computes whole batches with `keep_bytes_rows`,
    the same function underneath); rows are pass-major, row = t * b + i.
    """
    if b >= MAX_ROWS:
        raise InvalidInputError(f"too many rows ({b}) for the mask counter")
    rows = torch.arange(row_start, row_stop, dtype=torch.int64, device=device)
    t = torch.div(rows, b, rounding_mode="floor")
    keys = torch.full_like(rows, signed_key(seed, layer))
    return keep_bytes_rows(keys, counter_base(t, rows - t * b), features)


def keep_bytes_numpy(
    seed: int, layer: int, b: int, row_start: int, row_stop: int, features: int
) -> np.ndarray:
    """The same bytes as `keep_bytes`, computed with numpy (little-endian hosts)."""
    words = words_per_row(features)
    rows = np.arange(row_start, row_stop, dtype=np.uint64)
    t = rows // np.uint64(b)
    i = rows - t * np.uint64(b)
    base = (t << np.uint64(PASS_SHIFT)) + (i << np.uint64(ROW_SHIFT))
    ctr = base[:, None] + np.arange(words, dtype=np.uint64)[None, :]
    with np.errstate(over="ignore"):
        z = ctr * np.uint64(GAMMA) + np.uint64(layer_key(seed, layer))
    return mix64_numpy(z).view(np.uint8)[:, :features]
