"""Training MC-dropout MLPs with the protocol of the MC dropout paper (no web framework here)."""

from service.training.mlp import (
    FittedMLP,
    GridPoint,
    TrainResult,
    categorical_log_likelihood,
    mc_predict,
    mixture_log_likelihood,
    train_mlp,
    train_mlps,
)

__all__ = [
    "FittedMLP",
    "GridPoint",
    "TrainResult",
    "categorical_log_likelihood",
    "mc_predict",
    "mixture_log_likelihood",
    "train_mlp",
    "train_mlps",
]
