"""Vector scaling of MC dropout logits (Guo et al. 2017), fitted on calibration data.

Where temperature scaling divides every class's logit by one number, vector scaling gives each
class k a scale s_k > 0 and a bias b_k: each pass's probabilities are softmax(z_t * s + b), and
the passes are averaged, as the served summary does (service/engine/scaling.py). Unlike a
temperature it can move the argmax, so it corrects a network that over-predicts one class.

The fit minimises the NLL of the MC-averaged probabilities on the calibration rows plus a small
L2 penalty towards temperature scaling: ``l2`` times the summed squared deviations of log s from
their mean and of b from theirs (added to the row-mean NLL), so classes with few rows stay near
the common temperature. s = exp(log s) stays > 0. The bias is only defined up to a constant
(softmax ignores it), so the fitted bias is centred to mean 0. Torch L-BFGS in float64 on the
CPU: deterministic for the same inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from service.calibration.temperature import BOUNDS
from service.engine.scaling import calibrated_logits
from service.engine.summaries import softmax

L2 = 1e-3  # per row-mean NLL, on the deviations of log s and of b from their means
_P_FLOOR = 1e-300  # log(0) guard, as temperature.py
_ROUNDS = 20  # L-BFGS calls (each up to _ITER iterations) until the loss stops moving
_ITER = 100
_RUNAWAY = math.log(10.0 / BOUNDS[0])  # mean log scale: ten times past the largest allowed


@dataclass(frozen=True)
class VectorFit:
    scale: np.ndarray  # [K] > 0
    bias: np.ndarray  # [K], mean 0


def mc_probabilities(logits: np.ndarray, scale: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """[B, K] mean over passes of softmax(logits_t * scale + bias)."""
    return softmax(calibrated_logits(logits, 1.0, scale, bias), axis=-1).mean(axis=0)


def row_nll(logits: np.ndarray, y: np.ndarray, scale: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Per row -log p_y of the MC-averaged vector-scaled probabilities: [B]."""
    p = mc_probabilities(logits, scale, bias)
    yi = np.asarray(y).astype(np.int64)
    return np.asarray(-np.log(np.maximum(p[np.arange(p.shape[0]), yi], _P_FLOOR)))


def nll(logits: np.ndarray, y: np.ndarray, scale: np.ndarray, bias: np.ndarray) -> float:
    return float(row_nll(logits, y, scale, bias).mean())


def loss(
    z: torch.Tensor, y: torch.Tensor, log_scale: torch.Tensor, bias: torch.Tensor, l2: float = L2
) -> torch.Tensor:
    """The fitted objective: row-mean NLL of mean_t softmax(z_t * exp(log_scale) + bias) over
    ``z`` [T, N, K] and labels ``y`` [N], plus ``l2`` times the penalty towards one temperature."""
    t = z.shape[0]
    logp = torch.log_softmax(z * torch.exp(log_scale) + bias, dim=-1)  # [T, N, K]
    logp_y = logp.gather(-1, y.view(1, -1, 1).expand(t, -1, 1)).squeeze(-1)  # [T, N]
    mixture = torch.logsumexp(logp_y, dim=0) - math.log(t)  # log of the mean over passes
    penalty = ((log_scale - log_scale.mean()) ** 2).sum() + ((bias - bias.mean()) ** 2).sum()
    return -mixture.mean() + l2 * penalty


def fit(logits: np.ndarray, y: np.ndarray, l2: float = L2, start: float = 1.0) -> VectorFit:
    """Per-class scale and bias minimising `loss` on [T, N, K] logits and labels [N].

    ``start``: the common scale to begin from (1 / a fitted temperature is a good one)."""
    z_np = np.asarray(logits, dtype=np.float64)
    if z_np.ndim != 3:
        raise ValueError(f"logits must be [T, N, K], got shape {z_np.shape}")
    k = z_np.shape[-1]
    yi = np.asarray(y).astype(np.int64)
    if yi.shape != (z_np.shape[1],) or yi.min(initial=0) < 0 or yi.max(initial=0) >= k:
        raise ValueError(f"labels must be [N] = [{z_np.shape[1]}] integers in 0..{k - 1}")
    z, yt = torch.from_numpy(z_np), torch.from_numpy(yi)
    log_scale = torch.full((k,), math.log(start), dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [log_scale, bias],
        lr=1.0,
        max_iter=_ITER,
        tolerance_grad=1e-10,
        tolerance_change=1e-14,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    seen: list[float] = []

    def closure() -> torch.Tensor:
        opt.zero_grad()
        value = loss(z, yt, log_scale, bias, l2)
        value.backward()
        seen.append(float(value.detach()))
        # Running off never ends by itself (the loss keeps falling): stop it early, well past
        # the bound _check applies, and only at a point that is the best yet (a line search
        # tries far points whose loss is worse: taking one for a runaway refused a good fit).
        far = float(log_scale.detach().mean()) > _RUNAWAY
        if not math.isfinite(seen[-1]) or (far and seen[-1] <= min(seen)):
            raise _RanOff
        return value

    last, ran_off = math.inf, False
    with torch.enable_grad():
        for _ in range(_ROUNDS):
            try:
                opt.step(closure)
            except _RanOff:
                ran_off = True
                break
            value = min(seen)
            if abs(last - value) <= 1e-13 * max(1.0, abs(value)):
                break
            last = value
    s = torch.exp(log_scale.detach()).numpy().copy()
    b = bias.detach().numpy().copy()
    _check(s, b, z_np, yi, ran_off)
    return VectorFit(scale=s, bias=b - b.mean())


class _RanOff(Exception):
    """Raised inside the optimiser's closure to leave it."""


class Diverged(ValueError):
    """The fit ran off: its common scale past the temperature's range, or not finite."""


def _check(
    scale: np.ndarray, bias: np.ndarray, z: np.ndarray, y: np.ndarray, ran_off: bool
) -> None:
    """Nothing bounds the common scale (the penalty ties the classes to their mean only): on
    rows with almost no errors the NLL falls as it grows, to 1e5 on digits' 359 rows with 2
    errors, or NaN. A temperature stays >= BOUNDS[0]; so must 1 / the scales' geometric mean."""
    hi = 1.0 / BOUNDS[0]  # a small scale (an uninformative model flattened) is a fit
    common = float(np.exp(np.mean(np.log(scale)))) if np.all(scale > 0) else math.nan
    finite = np.all(np.isfinite(scale)) and np.all(np.isfinite(bias))
    if not ran_off and finite and common <= hi:
        return
    wrong = int(np.count_nonzero(softmax(z, axis=-1).mean(axis=0).argmax(axis=-1) != y))
    raise Diverged(
        f"vector scaling ran off (common scale {common:.3g}, over {hi:g}, the largest a "
        f"temperature may give): {wrong} of the {y.size} calibration rows are misclassified, "
        "too few errors to fit a scale per class"
    )
