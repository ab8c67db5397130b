"""Training MC-dropout MLPs with the protocol of the MC dropout paper (no web framework here)."""

from service.training.mlp import train_mlp, train_mlps
from service.training.results import FittedMLP, GridPoint, TrainResult
from service.training.scoring import (
    categorical_log_likelihood,
    mc_predict,
    mixture_log_likelihood,
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
