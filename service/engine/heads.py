"""A regressor's raw outputs as per-pass Gaussians: means and noise variances.

A heteroscedastic regressor (manifest ``aleatoric.kind = "heteroscedastic"``) outputs, per
input, its D target means followed by D variance parameters v (Kendall & Gal 2017):
``log_variance`` gives s^2 = exp(v), ``softplus_std`` gives s = log(1 + exp(v)). Over T passes the
predictive distribution is the mixture of the T Gaussians N(f_t, s_t^2); `regression` reduces it.
Every other regressor outputs D means and has one noise variance (or none) for every input.

Pure numpy: used by the served model, calibration and evaluation alike.
"""

from __future__ import annotations

import numpy as np

from service.bundle.manifest import Aleatoric, Manifest
from service.errors import InvalidInputError

# exp(709.78) overflows float64, and a mean over up to 2^20 passes of exp(700) would too; a
# larger log-variance is not a model's honest answer, and an infinite variance would only be
# refused later with a vaguer message.
_MAX_LOG_VARIANCE = 600.0


def outputs_per_target(aleatoric: Aleatoric) -> int:
    """How many model outputs each target takes: 2 (mean, variance parameter) or 1 (mean)."""
    return 2 if aleatoric.kind == "heteroscedastic" else 1


def expected_outputs(manifest: Manifest) -> int:
    """The width of the model's output row that the manifest declares."""
    if manifest.outputs.labels:
        return len(manifest.outputs.labels)
    return len(manifest.outputs.target_names) * outputs_per_target(manifest.aleatoric)


def variance(v: np.ndarray, parameterisation: str) -> np.ndarray:
    """Noise variance s^2 from the variance head's raw outputs (float64, same shape)."""
    raw = np.asarray(v, dtype=np.float64)
    if parameterisation == "log_variance":
        over = raw > _MAX_LOG_VARIANCE
        if np.any(over):
            # An error of the input's answer (a 422 as any other, a clean CLI error), not a
            # ValueError: the adaptive path and `calibrate` let that through as a 500/traceback.
            at = np.argwhere(over)[0]
            row = f" for input {int(at[-2])}" if raw.ndim >= 2 else ""
            raise InvalidInputError(
                f"the log-variance head output {float(raw[tuple(at)]):.4g}{row} overflows a "
                f"variance (over {_MAX_LOG_VARIANCE:g}); the model's noise head is unusable "
                "for that input"
            )
        return np.exp(raw)
    if parameterisation == "softplus_std":
        # log(1 + e^v) without overflow for large v and without loss for very negative v.
        return np.square(np.logaddexp(0.0, raw))
    raise ValueError(f"unknown variance parameterisation {parameterisation!r}")


def split(raw: np.ndarray, aleatoric: Aleatoric) -> tuple[np.ndarray, float | np.ndarray | None]:
    """Means ``[..., D]`` and noise variance (None, a number, or per pass ``[..., D]``) from a
    regressor's raw outputs ``[..., D * outputs_per_target]``; a view, no copy, of the means."""
    if aleatoric.kind != "heteroscedastic":
        return raw, (aleatoric.noise_var or None)
    assert aleatoric.parameterisation is not None  # the manifest's validator guarantees it
    d = raw.shape[-1] // 2
    return raw[..., :d], variance(raw[..., d:], aleatoric.parameterisation)
