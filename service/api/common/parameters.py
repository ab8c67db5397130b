"""Prediction parameters: the request model every adapter accepts, and its conversion to the
engine's typed `PredictParams` (defaults from the model's manifest, limits from the settings)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    ValidatorFunctionWrapHandler,
    WithJsonSchema,
    WrapValidator,
)
from pydantic_core import PydanticCustomError

from service.engine.adaptive import Adaptive, first_passes
from service.engine.model import ServedModel
from service.engine.params import PredictParams, default_interval, resolve_interval
from service.engine.summaries import check_levels
from service.errors import InvalidInputError

MAX_SEED = 2**63 - 1
Passes = Annotated[int, Field(ge=2, strict=True)]


def _or_auto(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """samples: "auto", or a whole number checked as before (a plain union would name its
    branches in every error's location: parameters.samples.constrained-int)."""
    if isinstance(value, str):
        if value == "auto":
            return value
        raise PydanticCustomError("int_or_auto", 'Input should be a valid integer or "auto"')
    return handler(value)


if TYPE_CHECKING:
    Samples = int | Literal["auto"]
else:
    Samples = Annotated[
        Passes,
        WrapValidator(_or_auto),
        WithJsonSchema({"anyOf": [{"type": "integer", "minimum": 2}, {"const": "auto"}]}),
    ]
# samples="auto" (service.engine.adaptive): passes double from 32 (a classifier: from its
# default) until the answer is sure.
AUTO_SAMPLES = (
    "MC passes, or auto (adaptive: until the answer's decisions are sure); default: the model's"
)
AUTO_MAX = "samples=auto: at most this many passes; default: the server's max_samples"
PASSES_USED = "samples=auto: the passes this input's answer used (all of a request's inputs alike)"
AUTO_TOLERANCE = (
    "samples=auto: stop when the Monte Carlo standard error of each decision is below this "
    "(probability units for classifiers, a fraction of the std for regressors); default 0.01"
)


class PredictParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    samples: Samples | None = Field(default=None, description=AUTO_SAMPLES)
    max_samples: Passes | None = Field(default=None, description=AUTO_MAX)
    tolerance: float | None = Field(
        default=None, gt=0, allow_inf_nan=False, strict=True, description=AUTO_TOLERANCE
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
    dropout_sites: Literal["all"] | StrictInt | None = Field(
        default=None,
        description="dropout sites to sample: 'all' or k (the last k, 1 <= k <= the model's "
        "sites); default: the model's",
    )
    timeout_ms: float | None = Field(
        default=None,
        gt=0,
        strict=True,
        allow_inf_nan=False,
        description="deadline for this request",
    )


def ignored(p: PredictParameters) -> list[str]:
    """A warning naming the parameters deterministic mode does not use (it was silent)."""
    if p.mode != "deterministic":
        return []
    names = (
        "samples",
        "max_samples",
        "tolerance",
        "seed",
        "confidence",
        "interval",
        "dropout_sites",
    )
    given = [k for k in names if getattr(p, k) is not None]
    if not given:
        return []
    return [f"mode=deterministic ignores {', '.join(given)}: dropout is off, one pass is run"]


def to_params(p: PredictParameters, model: ServedModel, max_samples: int) -> PredictParams:
    d = model.manifest.defaults
    conf = p.confidence if p.confidence is not None else d.confidence
    levels = check_levels([conf] if isinstance(conf, float | int) else conf)
    if p.mode == "deterministic":  # one pass, dropout off: the MC parameters are named in a
        # warning (`ignored`), never refused (samples over max_samples, or a classifier's
        # interval=gaussian, were 422s; a model default over max_samples refused every one)
        interval = default_interval(model.manifest)
        return PredictParams(1, levels, p.seed, p.mode, interval, None, p.dropout_sites)
    auto = _adaptive(p, max_samples)
    if auto is not None:  # the first chunk's passes; more are queued until the answer is sure
        interval = p.interval or default_interval(model.manifest)
        samples = first_passes(
            PredictParams(0, levels, interval=interval), auto, model.manifest.task, d.samples
        )
    else:
        samples = p.samples if isinstance(p.samples, int) else d.samples
    if samples > max_samples and p.samples is None:  # the client sent none: say whose it is
        raise InvalidInputError(
            f"this model's default samples={samples} is over the server's maximum of "
            f"{max_samples} (setting max_samples): send samples (at most {max_samples}), or ask "
            "the operator to raise MCSERVE_MAX_SAMPLES"
        )
    if samples > max_samples:
        raise InvalidInputError(
            f"samples={samples} is over the maximum of {max_samples} (setting max_samples)"
        )
    interval = resolve_interval(
        model.manifest, p.interval, samples=samples, levels=levels, mode=p.mode
    )
    return PredictParams(samples, levels, p.seed, p.mode, interval, auto, p.dropout_sites)


def _adaptive(p: PredictParameters, limit: int) -> Adaptive | None:
    """samples="auto" with its max_samples and tolerance (defaults: the server's maximum and
    Adaptive's tolerance); those two without auto are refused rather than ignored."""
    if p.samples != "auto":
        if p.max_samples is not None or p.tolerance is not None:
            raise InvalidInputError(
                'max_samples and tolerance apply to samples=auto only; send samples="auto" '
                "or leave them out"
            )
        return None
    most = p.max_samples if p.max_samples is not None else limit
    if most > limit:
        raise InvalidInputError(
            f"max_samples={most} is over the server's maximum of {limit} (setting max_samples)"
        )
    first = min(Adaptive.first, most)  # max_samples 2..31 was refused ("first (32) <= ...")
    if p.tolerance is None:
        return Adaptive(max_samples=most, first=first)
    return Adaptive(max_samples=most, tolerance=p.tolerance, first=first)


def mc_metadata(model: ServedModel) -> dict[str, Any]:
    """The dropout-site setting: the default and what a request may choose instead."""
    n, default = len(model.manifest.dropout), model.manifest.sampled_sites
    return {
        "dropout_sites": "all" if default is None else default,
        "sites": n,
        "allowed": f"'all' or k with 1 <= k <= {n} (the last k sites in graph order)",
    }
