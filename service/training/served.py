"""What `python -m service train` serves of a fitted MLP: the module with both standardisations
baked in (clients send raw feature values and get the target's units), its check against the
fitted model, and the held-out numbers written into the manifest."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from service.calibration.metrics import mixture_log_likelihood
from service.errors import ModelError
from service.nn import Affine
from service.training.results import FittedMLP

METRIC_PASSES = 100  # MC passes for the held-out metrics (the bundle's default samples)
SERVED_TOLERANCE = 1e-2  # served vs fitted answers, in target standard deviations (or logits)


def served_module(fitted: FittedMLP) -> nn.Sequential:
    """Raw inputs in, raw target (or logits) out: the fitted layers between two Affines."""

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(a, dtype=np.float64), dtype=torch.float32)

    layers: list[nn.Module] = [Affine.of(t(fitted.x_mean), t(fitted.x_std)), *fitted.model]
    if fitted.task == "regression":
        layers.append(Affine.of(*(t(a) for a in fitted.output_affine())))
    return nn.Sequential(*layers).eval()


def fitted_deterministic(fitted: FittedMLP, x: np.ndarray) -> np.ndarray:
    """The fitted model's dropout-free prediction in original units (logits for classifiers)."""
    xs = ((np.asarray(x, np.float64) - fitted.x_mean) / fitted.x_std).astype(np.float32)
    with torch.inference_mode():
        out = fitted.model.eval()(torch.from_numpy(xs)).double().numpy()
    if fitted.task == "regression":
        return fitted.to_original(out)
    return np.asarray(out)


def check_served(module: nn.Module, fitted: FittedMLP, x: np.ndarray) -> None:
    """Refuse a served module that does not give the fitted model's dropout-free answers."""
    with torch.inference_mode():
        got = module.eval()(torch.as_tensor(x, dtype=torch.float32)).double().numpy()
    want = fitted_deterministic(fitted, x)
    # Relative to the target's spread, not the answer's size: rtol had passed a target of
    # 1e9 + noise (std 2) served in float32 steps of 64. `table.PRECISION` refuses such columns
    # before training; this allows ten times that for the float32 arithmetic between.
    scale = float(np.max(fitted.y_std)) if fitted.y_std is not None else 1.0
    if not np.allclose(got, want, rtol=0.0, atol=SERVED_TOLERANCE * scale):
        raise ModelError(
            "the served module (float32) does not reproduce the fitted model's predictions on "
            "the training rows; are some columns' values near float32's limits (3.4e38), far "
            "from zero for their spread, or spread over many orders of magnitude? rescale them "
            "(subtract an offset, other units)"
        )


def fixed_noise_var(fitted: FittedMLP) -> float | None:
    """The served fixed noise variance 1/tau in target units (None: learned noise or a
    classifier), refused when it is not a finite positive number: a target of 1e200 had
    squared its spread past float64 and failed with a math domain error."""
    if fitted.tau is None:
        return None
    tau = float(fitted.tau[0])
    if not (math.isfinite(tau) and tau > 0 and math.isfinite(1.0 / tau)):
        raise ModelError(
            f"the fitted noise precision tau = {tau:g} (1/variance, target units) is not a "
            "usable number: the target's values span too wide a range; rescale the target "
            "(other units)"
        )
    return 1.0 / tau


def held_out_metrics(
    fitted: FittedMLP, x: np.ndarray, y: np.ndarray, seed: int
) -> dict[str, float]:
    """Held-out numbers on the calibration rows (MC averages, `METRIC_PASSES` passes)."""
    if len(x) == 0:
        return {}
    samples = fitted.sample(x, METRIC_PASSES, seed=seed)  # [T, N, D]
    if fitted.task == "classification":
        probs = samples.mean(axis=0)
        p_true = np.clip(probs[np.arange(len(y)), y], 1e-12, 1.0)
        return {
            "calibration_accuracy": round(float((probs.argmax(-1) == y).mean()), 6),
            "calibration_nll": round(float(-np.log(p_true).mean()), 6),
        }
    f, yt = samples[:, :, 0], y
    if fitted.learned_noise:  # the mixture of the passes' learned Gaussians
        ll = mixture_log_likelihood(f, yt, np.exp(samples[:, :, 1]))
    else:
        fixed_noise_var(fitted)  # a finite, positive tau (or a clear error)
        assert fitted.tau is not None
        tau = float(fitted.tau[0])
        sq = -0.5 * tau * (f - yt) ** 2  # [T, N]
        m = sq.max(axis=0)
        ll = m + np.log(np.exp(sq - m).mean(axis=0)) + 0.5 * (math.log(tau) - math.log(2 * math.pi))
    return {
        "calibration_rmse": round(float(np.sqrt(((f.mean(axis=0) - yt) ** 2).mean())), 6),
        "calibration_ll": round(float(ll.mean()), 6),
    }
