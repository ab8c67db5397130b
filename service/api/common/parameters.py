"""Prediction parameters: the request model every adapter accepts, and its conversion to the
engine's typed `PredictParams` (defaults from the model's manifest, limits from the settings)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat

from service.engine.model import PredictParams, ServedModel, resolve_interval
from service.engine.summaries import check_levels
from service.errors import InvalidInputError

MAX_SEED = 2**63 - 1


class PredictParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    samples: int | None = Field(
        default=None, ge=2, strict=True, description="MC passes; default: the model's"
    )
    # Strict: numbers in strings are refused here as in the instances (one rule, README).
    confidence: StrictFloat | list[StrictFloat] | None = Field(
        default=None, description="a level in (0, 1) or a list of up to 5; default: the model's"
    )
    seed: int | None = Field(
        default=None, ge=0, le=MAX_SEED, strict=True, description="replay a previous answer"
    )
    mode: Literal["mc", "deterministic"] = "mc"
    interval: Literal["gaussian", "quantile", "conformal"] | None = None
    timeout_ms: float | None = Field(
        default=None, gt=0, strict=True, description="deadline for this request"
    )


def ignored(p: PredictParameters) -> list[str]:
    """A warning naming the parameters deterministic mode does not use (it was silent)."""
    if p.mode != "deterministic":
        return []
    given = [k for k in ("samples", "seed", "confidence", "interval") if getattr(p, k) is not None]
    if not given:
        return []
    return [f"mode=deterministic ignores {', '.join(given)}: dropout is off, one pass is run"]


def to_params(p: PredictParameters, model: ServedModel, max_samples: int) -> PredictParams:
    d = model.manifest.defaults
    samples = p.samples if p.samples is not None else d.samples
    if samples > max_samples:
        raise InvalidInputError(
            f"samples={samples} is over the maximum of {max_samples} (setting max_samples)"
        )
    conf = p.confidence if p.confidence is not None else d.confidence
    levels = check_levels([conf] if isinstance(conf, float | int) else conf)
    interval = resolve_interval(
        model.manifest, p.interval, samples=samples, levels=levels, mode=p.mode
    )
    return PredictParams(samples, levels, p.seed, p.mode, interval)
