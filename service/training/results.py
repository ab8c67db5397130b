"""What training returns: the grid's scores, the fitted models and their standardisation."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from service.training.scoring import mc_predict
from service.training.stack import Task


@dataclass(frozen=True)
class GridPoint:
    """One grid configuration and its validation scores (log-likelihood per row, nats)."""

    dropout_rate: float
    # As given in the grid (units: `tau_units`), or fitted (standardised units, noise="fit");
    # None for classification and for a learned noise.
    tau: float | None
    weight_decay: float  # reg of the L2 penalty reg * ||W||^2 during the grid run
    val_ll: float
    val_rmse: float | None = None  # regression, original units, MC mean
    val_accuracy: float | None = None  # classification, MC-averaged probabilities


@dataclass
class FittedMLP:
    """A trained network and the numbers needed to use it on raw inputs."""

    model: nn.Sequential  # Dropout, Linear, ReLU, Dropout, ..., Linear on standardised inputs
    x_mean: np.ndarray
    x_std: np.ndarray
    y_mean: np.ndarray | None  # regression: outputs are (y - y_mean) / y_std
    y_std: np.ndarray | None
    dropout_rate: float
    tau: np.ndarray | None  # noise precision per output, original target units
    tau_standardised: np.ndarray | None  # the same precision for the standardised target
    weight_decay: float
    task: Task
    n_rows: int  # rows it was trained on
    learned_noise: bool = False  # outputs D means then D log-variances (standardised units)

    def sample(
        self, x: np.ndarray, passes: int, seed: int = 0, batch_rows: int = 1 << 18
    ) -> np.ndarray:
        """[T, B, D] MC samples for raw inputs: targets in original units, or probabilities."""
        xs = (np.asarray(x, dtype=np.float64) - self.x_mean) / self.x_std
        out = mc_predict(self.model, xs.astype(np.float32), passes, seed, batch_rows).numpy()
        if self.task == "classification":
            return np.asarray(torch.softmax(torch.from_numpy(out), dim=-1).numpy())
        return self.to_original(out)

    def output_affine(self) -> tuple[np.ndarray, np.ndarray]:
        """(shift, scale) with original = (standardised - shift) / scale, per output (regression):
        a mean is y_std f + y_mean; a log-variance gains 2 log y_std."""
        assert self.y_mean is not None and self.y_std is not None
        ym, ys = np.asarray(self.y_mean, np.float64), np.asarray(self.y_std, np.float64)
        shift, scale = -ym / ys, 1.0 / ys
        if self.learned_noise:
            shift = np.concatenate([shift, -2.0 * np.log(ys)])
            scale = np.concatenate([scale, np.ones_like(ys)])
        return shift, scale

    def to_original(self, out: np.ndarray) -> np.ndarray:
        """Standardised regression outputs [..., outputs] in the target's units."""
        assert self.y_mean is not None and self.y_std is not None
        d = len(self.y_std)
        means = out[..., :d] * self.y_std + self.y_mean
        if not self.learned_noise:
            return np.asarray(means)
        return np.concatenate([means, out[..., d:] + 2.0 * np.log(self.y_std)], axis=-1)


@dataclass
class TrainResult:
    """The chosen configuration, refitted on all rows, and what led to it."""

    final: FittedMLP  # chosen configuration trained on all rows
    holdout: FittedMLP  # the same configuration trained on the first rows only (grid run)
    grid: list[GridPoint]
    chosen: int  # index into grid
    n_fit: int  # rows of the grid run; the validation rows are the remaining n_val
    n_val: int
    epochs: int
    timings: dict[str, float] = field(default_factory=dict)  # seconds, see train_mlps
    notes: list[str] = field(default_factory=list)  # e.g. the choice is on the grid's edge

    @property
    def model(self) -> nn.Sequential:
        return self.final.model

    @property
    def dropout_rate(self) -> float:
        return self.final.dropout_rate

    @property
    def tau(self) -> np.ndarray | None:
        return self.final.tau
