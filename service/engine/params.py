"""A request's parameters as the engine takes them, and the interval method it gets.

Resolved before any queueing (api/common/parameters.py): a request that names no interval gets
its task's default; one that names an interval its model cannot honour is refused with the reason.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from service.bundle.manifest import Manifest
from service.engine.masks import MAX_SEED
from service.engine.prediction import Mode
from service.engine.summaries import level_text, min_samples_for_quantile
from service.errors import InvalidInputError

if TYPE_CHECKING:
    from service.engine.adaptive import Adaptive

IntervalMethod = Literal["gaussian", "quantile", "conformal"]


@dataclass(frozen=True)
class PredictParams:
    samples: int
    confidence: tuple[float, ...]
    seed: int | None = None
    mode: Mode = "mc"
    interval: IntervalMethod = "gaussian"
    # samples="auto": `samples` is the pass count of the next chunk (adaptive.py)
    auto: Adaptive | None = None
    # Which dropout sites to sample: "all", the last k (graph order), None: the model's default.
    dropout_sites: int | Literal["all"] | None = None


# Seeds need to be distinct, not secret: one OS-seeded generator per process (getrandom() per
# request was measurable under load).
_SEEDS = random.Random(int.from_bytes(os.urandom(16), "little"))


# Drawn seeds stay below 2**53, JavaScript's largest exact integer: a 63-bit seed came back
# rounded through JSON.parse (the model page, any browser client), and replaying the rounded one
# gave another answer. A client may still send any seed up to 2**63 - 1.
DRAWN_SEED_BITS = 53


def new_seed() -> int:
    return _SEEDS.getrandbits(DRAWN_SEED_BITS) & MAX_SEED


def default_interval(manifest: Manifest) -> IntervalMethod:
    """The interval method a request gets when it names none, per task: a classifier's only
    method is per-class quantiles of p over the passes (its conformal answer is the prediction
    set, not an interval), whatever its manifest's `defaults.interval` says."""
    return "quantile" if manifest.task == "classification" else manifest.defaults.interval


def resolve_interval(
    manifest: Manifest,
    given: IntervalMethod | None,
    *,
    samples: int,
    levels: tuple[float, ...],
    mode: Mode,
) -> IntervalMethod:
    """A request's interval method: ``given``, else the task's default. A classifier refuses
    what it cannot honour, with the reason; quantiles asked for by name are refused at levels
    the samples cannot reach, by default such levels are dropped with a warning (`summarize`)."""
    if manifest.task == "regression":
        return given or manifest.defaults.interval
    if given in ("gaussian", "conformal"):
        also = (
            "; its conformal answer is the prediction_set, which a calibrated classifier "
            "always gives"
            if given == "conformal"
            else ""
        )
        raise InvalidInputError(
            f"interval={given} is for regressors: a classifier's per-class intervals are "
            f"quantiles of its class probabilities over the passes (interval=quantile, the "
            f"default){also}"
        )
    if given == "quantile" and mode == "mc":
        for level in levels:
            need = min_samples_for_quantile(level)
            if samples < need:
                raise InvalidInputError(
                    f"quantile intervals at {level_text(level)} need samples >= {need} (got "
                    f"{samples}); ask for samples={need} or a lower confidence"
                )
    return "quantile"
