"""Train MC-dropout MLPs with the protocol of Gal & Ghahramani (2016), and sample them.

Protocol (docs/UCI.md, /work/shared/datasets/uci/README.md): standardise inputs and targets with
the training rows' mean and std (a constant column gets std 1); the network is Dropout, Linear,
ReLU, Dropout, ..., Linear; Adam, batch size 128, squared error (regression) or cross-entropy
(classification); an L2 penalty reg * ||W||^2 on the weights with reg = l^2 (1 - p) / (2 N tau),
l = 1e-2, N the rows the model is trained on. The (dropout rate, tau) grid is scored by MC
log-likelihood on the last `val_fraction` of the rows, the best configuration is retrained on all
rows.

`noise="fit"` (what `python -m service train` uses) replaces the tau grid by a fitted tau in
standardised units (`scoring.fit_precision`), and `noise="learned"` trains a log-variance head with
the Gaussian NLL; a choice on the edge of what was searched is said in `TrainResult.notes`.

Units of tau: the 2016 companion code (yaringal/DropoutUncertaintyExps, net/net.py) applies the
grid values of tau to de-standardised predictions, i.e. as precisions in ORIGINAL target units,
and puts the same number into the weight-decay formula. `tau_units="original"` (the default) does
the same, which is what makes the published grids (tau ~ 0.05 for concrete, whose target std is
~17) sensible; `tau_units="standardised"` reads the grid as precisions of the standardised target
instead (tau_orig = tau_std / y_std^2). Classification has no tau: the formula uses tau = 1.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from service.training.progress import progress as _progress
from service.training.results import FittedMLP, TrainResult
from service.training.selection import (
    NOMINAL_TAU,
    Noise,
    Prepared,
    TauUnits,
    best,
    edge_notes,
    prepare,
    score_grid,
    tau_pair,
)
from service.training.stack import Stack, Task, fit, init_stack, to_sequential

__all__ = ["Noise", "TauUnits", "train_mlp", "train_mlps"]

_STAGE_GRID, _STAGE_SCORE, _STAGE_REFIT = 0, 1, 2


def _generators(seeds: Sequence[int], stage: int) -> list[torch.Generator]:
    # An independent stream per (seed, stage): e.g. more validation passes leave the refit as is.
    out = []
    for s in seeds:
        state = np.random.SeedSequence([int(s), stage]).generate_state(2, np.uint32)
        out.append(torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1])))
    return out


def _decay(p: float, tau: float | None, n: int, lengthscale: float) -> float:
    return lengthscale**2 * (1.0 - p) / (2.0 * n * (1.0 if tau is None else tau))


def _fit_parts(
    stack: Stack,
    parts: Sequence[Prepared],
    decay: Tensor,
    gens: Sequence[torch.Generator],
    label: str,
    progress: bool,
    train: dict[str, Any],
) -> None:
    xs = torch.from_numpy(np.stack([p.x for p in parts]))
    ys = torch.from_numpy(np.stack([p.y for p in parts]))
    with _progress(progress, int(train["epochs"]), label) as cb:
        fit(stack, xs, ys, decay, gens, on_epoch=cb, **train)


def _fitted(
    stack: Stack,
    m: int,
    prep: Prepared,
    p: float,
    tau: float | None,
    decay: float,
    task: Task,
    units: TauUnits,
    learned: bool = False,
) -> FittedMLP:
    taus: tuple[np.ndarray | None, np.ndarray | None] = (None, None)
    if tau is not None and prep.y_std is not None:
        taus = tau_pair(tau, units, prep.y_std)
    return FittedMLP(
        to_sequential(stack, m, p),
        prep.x_mean,
        prep.x_std,
        prep.y_mean,
        prep.y_std,
        p,
        taus[0],
        taus[1],
        decay,
        task,
        int(prep.x.shape[0]),
        learned,
    )


def train_mlps(
    datasets: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    seeds: Sequence[int],
    hidden: Sequence[int] = (50,),
    dropout_rates: Sequence[float] = (0.005, 0.01, 0.05, 0.1),
    taus: Sequence[float] = (0.025, 0.05, 0.075),
    task: Task = "regression",
    tau_units: TauUnits = "original",
    epochs: int = 400,
    batch_size: int = 128,
    lr: float = 1e-3,
    lengthscale: float = 1e-2,
    val_fraction: float = 0.2,
    val_passes: int = 1000,
    progress: bool = False,
    noise: Noise = "grid",
) -> list[TrainResult]:
    """Grid-select and refit one MC-dropout MLP per data set (e.g. per split), all vectorised.

    datasets[i] = (x [N_i, in], y [N_i] or [N_i, out] floats, or [N_i] integer labels); the
    validation rows are the last `val_fraction` of each. Data sets of equal size train together
    in one stack (splits x configurations in the grid run, splits in the refit), each with its
    own generator from seeds[i]: data set i gets the same result as `train_mlp(*datasets[i],
    seed=seeds[i])` up to floating-point rounding. `timings` holds the wall seconds of the group
    a data set was trained in ("grid_train_s", "grid_score_s", "refit_s") and its size
    ("trained_together").
    """
    if len(seeds) != len(datasets):
        raise ValueError("one seed per data set")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError("val_fraction must be in (0, 1)")
    if noise != "grid" and task != "regression":
        raise ValueError(f"noise={noise!r} is for regression; a classifier has no noise level")
    learned = noise == "learned"
    if noise == "fit":
        tau_units = "standardised"  # the fitted tau is a precision of the standardised target
    tau_grid: list[float | None] = [None] if task != "regression" or learned else list(taus)
    if noise == "fit":
        tau_grid = [NOMINAL_TAU]
    configs = [(float(p), None if t is None else float(t)) for p in dropout_rates for t in tau_grid]
    xs_all = [np.asarray(x, dtype=np.float64) for x, _ in datasets]
    ys_all = [np.asarray(y) for _, y in datasets]
    if task == "regression":
        ys_all = [(y.reshape(len(y), -1)).astype(np.float64) for y in ys_all]
    n_classes = int(max(int(y.max()) for y in ys_all)) + 1 if task == "classification" else 0
    results: dict[int, TrainResult] = {}
    groups: dict[int, list[int]] = {}
    for i, x in enumerate(xs_all):
        groups.setdefault(len(x), []).append(i)
    for members in groups.values():
        n = len(xs_all[members[0]])
        n_fit = round((1.0 - val_fraction) * n)
        if not 0 < n_fit < n:
            raise ValueError(f"{n} rows leave no training or no validation rows")
        fit_parts = [prepare(xs_all[i][:n_fit], ys_all[i][:n_fit], task) for i in members]
        full_parts = [prepare(xs_all[i], ys_all[i], task) for i in members]
        out_dim = n_classes if task == "classification" else ys_all[members[0]].shape[1]
        out_dim *= 2 if learned else 1  # a mean and a log-variance per target
        dims = [xs_all[members[0]].shape[1], *hidden, out_dim]
        member_seeds = [seeds[i] for i in members]
        n_s, n_g = len(members), len(configs)

        # Grid run: model m = split * G + config.
        t0 = time.perf_counter()
        split_of = torch.arange(n_s).repeat_interleave(n_g)
        p_m = torch.tensor([p for _ in members for p, _ in configs])
        decay_m = torch.tensor([_decay(p, t, n_fit, lengthscale) for p, t in configs] * n_s)
        gens = _generators(member_seeds, _STAGE_GRID)
        stack = init_stack(dims, p_m, split_of, gens)
        train = {
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "task": task,
            "learned_noise": learned,
        }
        _fit_parts(stack, fit_parts, decay_m, gens, f"grid {n_s}x{n_g} models", progress, train)
        t1 = time.perf_counter()
        grid_decay = [_decay(p, t, n_fit, lengthscale) for p, t in configs]
        scores = score_grid(
            stack,
            members,
            xs_all,
            ys_all,
            fit_parts,
            configs,
            grid_decay,
            n_fit,
            task,
            tau_units,
            val_passes,
            _generators(member_seeds, _STAGE_SCORE),
            noise,
        )
        t2 = time.perf_counter()

        # Refit: one model per split, each with its own chosen configuration.
        chosen = [best(row) for row in scores]
        # The chosen point's tau: the grid's, or the one fitted for that model (noise="fit").
        picks = [(row[c].dropout_rate, row[c].tau) for row, c in zip(scores, chosen, strict=True)]
        p_r = torch.tensor([p for p, _ in picks])
        decay_r = torch.tensor([_decay(p, t, n, lengthscale) for p, t in picks])
        gens = _generators(member_seeds, _STAGE_REFIT)
        refit = init_stack(dims, p_r, torch.arange(n_s), gens)
        _fit_parts(refit, full_parts, decay_r, gens, f"refit {n_s} models", progress, train)
        t3 = time.perf_counter()

        timings = {"grid_train_s": t1 - t0, "grid_score_s": t2 - t1, "refit_s": t3 - t2}
        for s, i in enumerate(members):
            p, tau = picks[s]
            fin = float(decay_r[s])
            results[i] = TrainResult(
                final=_fitted(refit, s, full_parts[s], p, tau, fin, task, tau_units, learned),
                holdout=_fitted(
                    stack,
                    s * n_g + chosen[s],
                    fit_parts[s],
                    p,
                    tau,
                    float(decay_m[s * n_g + chosen[s]]),
                    task,
                    tau_units,
                    learned,
                ),
                grid=scores[s],
                chosen=chosen[s],
                n_fit=n_fit,
                n_val=n - n_fit,
                epochs=epochs,
                timings={**timings, "trained_together": float(n_s)},
                notes=edge_notes(scores[s], chosen[s], dropout_rates, tau_grid, noise),
            )
    return [results[i] for i in range(len(datasets))]


def train_mlp(
    x: np.ndarray,
    y: np.ndarray,
    *,
    seed: int = 0,
    hidden: Sequence[int] = (50,),
    dropout_rates: Sequence[float] = (0.005, 0.01, 0.05, 0.1),
    taus: Sequence[float] = (0.025, 0.05, 0.075),
    task: Task = "regression",
    tau_units: TauUnits = "original",
    epochs: int = 400,
    batch_size: int = 128,
    lr: float = 1e-3,
    lengthscale: float = 1e-2,
    val_fraction: float = 0.2,
    val_passes: int = 1000,
    progress: bool = False,
    noise: Noise = "grid",
) -> TrainResult:
    """Grid-select (dropout rate, tau) on validation log-likelihood and refit on all rows;
    with ``noise="fit"`` tau is fitted per dropout rate instead, with ``"learned"`` the net
    learns its noise per input (see `Noise`).

    x [N, in] raw inputs; y [N] or [N, out] raw targets (regression) or [N] integer labels
    (classification). All configurations train at once as one vectorised model. Same seed and
    inputs give identical results. See `train_mlps` for the arguments.
    """
    return train_mlps(
        [(x, y)],
        seeds=[seed],
        hidden=hidden,
        dropout_rates=dropout_rates,
        taus=taus,
        task=task,
        tau_units=tau_units,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        lengthscale=lengthscale,
        val_fraction=val_fraction,
        val_passes=val_passes,
        progress=progress,
        noise=noise,
    )[0]
