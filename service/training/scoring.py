"""MC sampling of a trained torch MLP and the log-likelihoods that score it (per row)."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

_LOG_2PI = math.log(2.0 * math.pi)
_DROPOUT_TYPES = (nn.modules.dropout._DropoutNd,)


def mc_predict(
    model: nn.Module, x: Tensor | np.ndarray, passes: int, seed: int = 0, batch_rows: int = 1 << 18
) -> Tensor:
    """[T, B, *out] outputs of T stochastic passes of `model` over x [B, *in].

    One forward over the input repeated T times (row t * c + i), chunked so that a forward holds
    at most `batch_rows` rows. Dropout modules run in training mode, everything else in eval mode
    (BatchNorm frozen); the modules' flags are restored afterwards. The global RNG is forked, so
    the result depends on `seed` only and the caller's random state is untouched.
    """
    if passes < 1:
        raise ValueError("passes must be >= 1")
    xt = torch.as_tensor(x, dtype=torch.float32)
    flags = {m: m.training for m in model.modules()}
    model.eval()
    for m in model.modules():
        if isinstance(m, _DROPOUT_TYPES):
            m.train()
    chunk = max(1, batch_rows // passes)
    try:
        with torch.random.fork_rng(devices=[]), torch.inference_mode():
            torch.manual_seed(seed)
            outs = []
            for start in range(0, int(xt.shape[0]), chunk):
                xc = xt[start : start + chunk]
                reps = (passes,) + (1,) * (xc.dim() - 1)
                out = model(xc.repeat(*reps))
                outs.append(out.reshape(passes, xc.shape[0], *out.shape[1:]))
            return torch.cat(outs, dim=1)
    finally:
        for m, flag in flags.items():
            m.train(flag)


def mixture_log_likelihood(samples: Tensor, y: Tensor, tau: Tensor) -> Tensor:
    """log (1/T) sum_t prod_d N(y_d; f_td, 1/tau_d) per row, by logsumexp.

    samples [..., T, B, D], y [..., B, D], tau [..., D] (broadcastable); returns [..., B].
    """
    t = samples.shape[-3]
    sq = (samples - y.unsqueeze(-3)).square() * tau.unsqueeze(-2).unsqueeze(-2)
    log_norm = 0.5 * (torch.log(tau) - _LOG_2PI).sum(-1, keepdim=True)
    return torch.logsumexp(-0.5 * sq.sum(-1), dim=-2) - math.log(t) + log_norm


def categorical_log_likelihood(logits: Tensor, y: Tensor) -> Tensor:
    """log (1/T) sum_t softmax(logits_t)[y] per row; logits [..., T, B, K], y [..., B] labels."""
    t = logits.shape[-3]
    logp = torch.log_softmax(logits, dim=-1)
    idx = y.unsqueeze(-2).expand(*logp.shape[:-1]).unsqueeze(-1)
    return torch.logsumexp(logp.gather(-1, idx).squeeze(-1), dim=-2) - math.log(t)


def learned_mixture_log_likelihood(means: Tensor, log_var: Tensor, y: Tensor) -> Tensor:
    """log (1/T) sum_t prod_d N(y_d; f_td, exp(v_td)) per row, by logsumexp.

    means and log_var [..., T, B, D] (a learned noise head's outputs), y [..., B, D]; -> [..., B].
    """
    t = means.shape[-3]
    sq = (means - y.unsqueeze(-3)).square() * torch.exp(-log_var)
    log_comp = -0.5 * (sq + log_var + _LOG_2PI).sum(-1)
    return torch.logsumexp(log_comp, dim=-2) - math.log(t)


# The fitted noise std is searched over 10^-4 to 10^1 target standard deviations, scanned every
# 0.05 decade and refined by golden section: a noise outside that range is said, not hidden.
FIT_LOG10_STD = (-4.0, 1.0)
_SCAN_STEP = 0.05


def fit_precision(samples: np.ndarray, y: np.ndarray) -> tuple[float, bool]:
    """The noise precision tau maximising the MC mixture log-likelihood of held-out rows.

    samples [T, N, D] MC outputs and y [N, D] targets, both standardised; one tau for every
    target (they share the standardised scale). Returns (tau, at_edge): at_edge when the best
    noise std is an end of `FIT_LOG10_STD`, i.e. the true one may lie outside it.
    """
    f = torch.from_numpy(np.asarray(samples, dtype=np.float64))
    yt = torch.from_numpy(np.asarray(y, dtype=np.float64))
    sq = (f - yt.unsqueeze(0)).square().sum(-1)  # [T, N]
    d, t = int(f.shape[-1]), int(f.shape[0])

    def ll(log10_std: float) -> float:
        tau = 10.0 ** (-2.0 * log10_std)
        comp = -0.5 * tau * sq
        norm = 0.5 * d * (math.log(tau) - _LOG_2PI)
        return float((torch.logsumexp(comp, dim=0) - math.log(t) + norm).mean())

    lo, hi = FIT_LOG10_STD
    grid = np.arange(lo, hi + _SCAN_STEP / 2, _SCAN_STEP)
    scores = [ll(float(g)) for g in grid]
    best = int(np.argmax(scores))
    at_edge = best in (0, len(grid) - 1)
    a = float(grid[max(best - 1, 0)])
    b = float(grid[min(best + 1, len(grid) - 1)])
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    for _ in range(30):  # the bracket shrinks to 0.1 * 0.618^30 decades: exact enough
        c, e = b - ratio * (b - a), a + ratio * (b - a)
        if ll(c) >= ll(e):
            b = e
        else:
            a = c
    best_std = (a + b) / 2.0
    if ll(float(grid[best])) > ll(best_std):
        best_std = float(grid[best])
    return 10.0 ** (-2.0 * best_std), at_edge
