"""Scoring a grid stack on validation rows and choosing from it (see mlp.py for the protocol).

Split from `mlp` for size: the standardisation of a data set (`Prepared`), the two units of
tau, the validation log-likelihood of every model of a stack (`score_grid`: with the grid's
tau, a fitted tau, or the model's learned noise), the choice (`best`) and the sentences that
say when it lies on the edge of what was searched (`edge_notes`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from service.training.results import GridPoint
from service.training.scoring import (
    FIT_LOG10_STD,
    categorical_log_likelihood,
    fit_precision,
    learned_mixture_log_likelihood,
    mixture_log_likelihood,
)
from service.training.stack import Stack, Task, mc_chunks

TauUnits = Literal["original", "standardised"]
# "grid": tau from `taus`; "fit": one training per dropout rate (decay at the nominal tau 1 of the
# standardised target), then the tau that maximises the validation log-likelihood, fitted
# (`fit_precision`), in standardised units; "learned": a log-variance head and the Gaussian NLL.
Noise = Literal["grid", "fit", "learned"]
NOMINAL_TAU = 1.0  # noise std = the target's std: the vaguest choice, for the grid run's decay


def _standardiser(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    std = a.std(axis=0)
    std[std == 0] = 1.0  # a constant column carries no information; keep it finite
    return a.mean(axis=0), std


@dataclass
class Prepared:
    x: np.ndarray  # standardised, float32
    y: np.ndarray  # standardised (regression) or labels
    x_mean: np.ndarray
    x_std: np.ndarray
    y_mean: np.ndarray | None
    y_std: np.ndarray | None


def prepare(x: np.ndarray, y: np.ndarray, task: Task) -> Prepared:
    x_mean, x_std = _standardiser(x)
    xs = ((x - x_mean) / x_std).astype(np.float32)
    if task == "classification":
        return Prepared(xs, y.astype(np.int64), x_mean, x_std, None, None)
    y_mean, y_std = _standardiser(y)
    return Prepared(xs, ((y - y_mean) / y_std).astype(np.float32), x_mean, x_std, y_mean, y_std)


def tau_pair(tau: float, units: TauUnits, y_std: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(original units, standardised units) per output."""
    if units == "original":
        orig = np.full_like(y_std, tau, dtype=np.float64)
        return orig, orig * y_std**2
    std = np.full_like(y_std, tau, dtype=np.float64)
    return std / y_std**2, std


def best(grid: Sequence[GridPoint]) -> int:
    """Index of the highest validation log-likelihood (NaN counts as -inf; ties: first)."""
    lls = [g.val_ll if math.isfinite(g.val_ll) else -math.inf for g in grid]
    return lls.index(max(lls))


def edge_notes(
    grid: Sequence[GridPoint],
    chosen: int,
    rates: Sequence[float],
    taus: Sequence[float | None],
    noise: Noise,
) -> list[str]:
    """Sentences for a choice on the edge of what was searched: the best may lie beyond it."""
    g, notes = grid[chosen], []
    if len(rates) > 1 and g.dropout_rate in (min(rates), max(rates)):
        end = "smallest" if g.dropout_rate == min(rates) else "largest"
        notes.append(
            f"the chosen dropout rate {g.dropout_rate:g} is the grid's {end}: a better one may lie "
            "beyond it; extend the grid"
        )
    if noise == "grid" and g.tau is not None and len(taus) > 1:
        grid_taus = [t for t in taus if t is not None]
        if g.tau in (min(grid_taus), max(grid_taus)):
            end = "smallest" if g.tau == min(grid_taus) else "largest"
            notes.append(
                f"the chosen tau {g.tau:g} is the grid's {end}: the noise level may lie beyond "
                "it; extend the grid (or fit it: noise='fit')"
            )
    if noise == "fit" and g.tau is not None:
        lo, hi = FIT_LOG10_STD
        std = g.tau**-0.5
        if not 10**lo * 1.2 < std < 10**hi / 1.2:
            notes.append(
                f"the fitted noise std {std:.3g} (in target standard deviations) is at the end "
                f"of the searched range [{10**lo:g}, {10**hi:g}]"
            )
    return notes


def score_grid(
    stack: Stack,
    members: Sequence[int],
    xs_all: Sequence[np.ndarray],
    ys_all: Sequence[np.ndarray],
    fit_parts: Sequence[Prepared],
    configs: Sequence[tuple[float, float | None]],
    decays: Sequence[float],
    n_fit: int,
    task: Task,
    tau_units: TauUnits,
    passes: int,
    gens: Sequence[torch.Generator],
    noise: Noise = "grid",
) -> list[list[GridPoint]]:
    """Validation log-likelihood (and RMSE or accuracy) of every model of the grid stack."""
    n_g = len(configs)
    x_val = np.stack(
        [
            ((xs_all[i][n_fit:] - fp.x_mean) / fp.x_std)
            for i, fp in zip(members, fit_parts, strict=True)
        ]
    )
    y_val = torch.from_numpy(np.stack([ys_all[i][n_fit:] for i in members]))[stack.split_of]
    n_val = int(x_val.shape[1])
    ll_sum = torch.zeros(stack.n_models, dtype=torch.float64)
    err_sum = torch.zeros(stack.n_models, dtype=torch.float64)
    kept: list[Tensor] = []  # noise="fit": every standardised output, to fit tau afterwards
    if task == "regression":
        mean = torch.from_numpy(np.stack([fp.y_mean for fp in fit_parts if fp.y_mean is not None]))
        std = torch.from_numpy(np.stack([fp.y_std for fp in fit_parts if fp.y_std is not None]))
        mean, std = mean[stack.split_of][:, None, None], std[stack.split_of][:, None, None]
        tau_orig = torch.from_numpy(
            np.stack(
                [
                    tau_pair(float(configs[g][1] or 1.0), tau_units, fp.y_std)[0]
                    for fp in fit_parts
                    if fp.y_std is not None
                    for g in range(n_g)
                ]
            )
        )
    xt = torch.from_numpy(x_val.astype(np.float32))
    for rows, out in mc_chunks(stack, xt, passes, gens):
        yc = y_val[:, rows]
        if task == "regression":
            d = int(yc.shape[-1])
            f = out[..., :d].double() * std + mean  # original units, [M, T, c, D]
            if noise == "learned":
                log_var = out[..., d:].double() + 2.0 * torch.log(std)
                ll_sum += learned_mixture_log_likelihood(f, log_var, yc).sum(-1)
            elif noise == "fit":
                kept.append(out.double())
            else:
                ll_sum += mixture_log_likelihood(f, yc, tau_orig).sum(-1)
            err_sum += (f.mean(1) - yc).square().sum((-1, -2))
        else:
            ll_sum += categorical_log_likelihood(out.double(), yc).sum(-1)
            probs = torch.softmax(out, dim=-1).mean(1)
            err_sum += (probs.argmax(-1) == yc).double().sum(-1)
    taus: list[float | None] = [configs[m % n_g][1] for m in range(stack.n_models)]
    if kept:
        outs = torch.cat(kept, dim=2)  # [M, T, n_val, D], standardised
        y_std_units = (y_val - mean[:, 0]) / std[:, 0]
        for m in range(stack.n_models):
            tau, _ = fit_precision(outs[m].numpy(), y_std_units[m].numpy())
            # Log-likelihood in original units: the standardised one less sum_d log y_std_d.
            f_m, y_m = outs[m : m + 1], y_std_units[m : m + 1]
            tau_t = torch.full((1, int(outs.shape[-1])), tau, dtype=torch.float64)
            ll_std = mixture_log_likelihood(f_m, y_m, tau_t).sum()
            ll_sum[m] = ll_std - n_val * torch.log(std[m]).sum()
            taus[m] = tau
    out_dim = 1 if task == "classification" else int(y_val.shape[-1])
    grids: list[list[GridPoint]] = []
    for s in range(len(members)):
        row = []
        for g, (p, _) in enumerate(configs):
            m = s * n_g + g
            row.append(
                GridPoint(
                    dropout_rate=p,
                    tau=taus[m],
                    weight_decay=decays[g],
                    val_ll=float(ll_sum[m]) / n_val,
                    val_rmse=math.sqrt(float(err_sum[m]) / (n_val * out_dim))
                    if task == "regression"
                    else None,
                    val_accuracy=float(err_sum[m]) / n_val if task == "classification" else None,
                )
            )
        grids.append(row)
    return grids
