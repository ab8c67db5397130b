"""Calibrated logits: the one place a classifier's raw logits meet its calibration.

A bundle calibrated by temperature scaling divides every pass's logits by ``temperature``;
one calibrated by vector scaling (Guo et al. 2017) also has a per-class ``class_scale`` and
``class_bias`` (its temperature is then 1): calibrated logits = (z / temperature) * scale + bias,
applied to each pass before its softmax. Served summaries, adaptive passes, conformal scores at
calibration time, evaluation and referral all read probabilities made from these logits, so
they cannot disagree. Shapes: ``z`` is ``[..., K]``; scale and bias are ``[K]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from service.errors import InvalidInputError


class ScalingError(InvalidInputError, ValueError):
    """A temperature, scale or bias that cannot calibrate these logits; says which and why."""


def check(
    k: int,
    temperature: float,
    scale: Sequence[float] | np.ndarray | None,
    bias: Sequence[float] | np.ndarray | None,
) -> tuple[float, np.ndarray | None, np.ndarray | None]:
    """Validated float64 (temperature, scale [K], bias [K]) for K classes."""
    try:
        t = float(temperature)
    except (TypeError, ValueError):
        t = math.nan
    if not (math.isfinite(t) and t > 0):
        raise ScalingError(f"temperature must be a finite number > 0 (got {temperature!r})")
    if (scale is None) != (bias is None):
        raise ScalingError("class scale and class bias go together: give both or neither")
    if scale is None or bias is None:
        return t, None, None
    s = np.asarray(scale, dtype=np.float64)
    b = np.asarray(bias, dtype=np.float64)
    if s.shape != (k,) or b.shape != (k,):
        raise ScalingError(
            f"class scale {s.shape} and bias {b.shape} need one value per class, ({k},)"
        )
    if not (np.isfinite(s).all() and np.isfinite(b).all() and (s > 0).all()):
        raise ScalingError("class scale must be finite and > 0, class bias finite")
    return t, s, b


def calibrated_logits(
    z: np.ndarray,
    temperature: float = 1.0,
    scale: np.ndarray | None = None,
    bias: np.ndarray | None = None,
) -> np.ndarray:
    """(z / temperature) * scale + bias over the last axis, in float64 (arguments as `check`
    returns them; without scale and bias exactly z / temperature, as before vector scaling)."""
    out = np.asarray(z, dtype=np.float64) / temperature
    if scale is not None and bias is not None:
        out = out * scale + bias
    return out
