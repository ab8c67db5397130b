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
