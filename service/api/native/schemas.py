"""Request and response models of the native API (/v1), also the OpenAPI documentation."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.api.common.parameters import PASSES_USED, PredictParameters

TRUNCATED = "text models: cut to max_tokens; audio models: cut to the model's clip length"
SAMPLE_RATE = "audio models: the file's own sample rate in Hz (resampled if not the model's)"


class PredictRequest(BaseModel):
    # Working examples, one per bundled model, are on the routes (service/api/common/examples.py).
    model_config = ConfigDict(extra="forbid")

    instances: list[list[Any] | dict[str, Any] | str] = Field(
        min_length=1,
        description="arrays of the input shape, or objects keyed by feature name; for text "
        'models, strings (or {"text": "..."}); for audio models, {"b64": "<a WAV file in '
        'base64>"}',
    )
    parameters: PredictParameters = PredictParameters()


class IntervalOut(BaseModel):
    level: float
    lower: float | None = Field(description="null: unbounded (conformal, calibration too small)")
    upper: float | None
    method: str = Field(description="gaussian, quantile or conformal")


class ReferralOut(BaseModel):
    refer: bool = Field(description="a human should look at this prediction")
    reasons: list[str] = Field(description="why, in words; empty when refer is false")
    triggers: list[str] = Field(
        description=(
            "per reason: epistemic, aleatoric, interval_width, prediction_set or extrapolation"
        )
    )
    extrapolation: bool = Field(
        description="some feature lies outside the training range; for a text model, more of "
        "its words than the calibrated share never appeared in the training texts"
    )


class PredictionSetOut(BaseModel):
    level: float = Field(description="conformal coverage of the true label, e.g. 0.95")
    labels: list[str]


class Uncertainty(BaseModel):
    predictive_entropy: float
    expected_entropy: float
    mutual_information: float
    variation_ratio: float


class RegressionPrediction(BaseModel):
    mean: float
    std: float | None = None
    epistemic_std: float | None = None
    aleatoric_std: float | None = None
    mc_standard_error: float | None = None
    intervals: list[IntervalOut] | None = None
    referral: ReferralOut | None = None
    tokens: int | None = Field(default=None, description="text models: tokens before any cut")
    seconds: float | None = Field(default=None, description="audio models: the clip's length")
    sample_rate: int | None = Field(default=None, description=SAMPLE_RATE)
    truncated: bool | None = Field(default=None, description=TRUNCATED)
    passes_used: int | None = Field(default=None, description=PASSES_USED)


class TargetPrediction(BaseModel):
    mean: float
    std: float | None = None
    epistemic_std: float | None = None
    aleatoric_std: float | None = None
    intervals: list[IntervalOut] | None = None
    mc_standard_error: float | None = None


class MultiOutputPrediction(BaseModel):
    targets: dict[str, TargetPrediction] = Field(
        description="a multi-output regressor: each target's summary, by its name"
    )
    referral: ReferralOut | None = Field(
        default=None, description="one decision for the input; each reason names its target"
    )
    passes_used: int | None = Field(default=None, description=PASSES_USED)


class ClassificationPrediction(BaseModel):
    label: str
    probabilities: dict[str, float]
    probability_std: dict[str, float] | None = None
    probability_se: dict[str, float] | None = None
    intervals: dict[str, list[IntervalOut]] | None = None
    uncertainty: Uncertainty | None = None
    prediction_set: PredictionSetOut | None = Field(
        default=None, description="calibrated models: at the first requested confidence level"
    )
    referral: ReferralOut | None = None
    tokens: int | None = Field(default=None, description="text models: tokens before any cut")
    seconds: float | None = Field(default=None, description="audio models: the clip's length")
    sample_rate: int | None = Field(default=None, description=SAMPLE_RATE)
    truncated: bool | None = Field(default=None, description=TRUNCATED)
    passes_used: int | None = Field(default=None, description=PASSES_USED)


class ModelRef(BaseModel):
    name: str
    version: str
    digest: str


class PredictResponse(BaseModel):
    predictions: list[RegressionPrediction | MultiOutputPrediction | ClassificationPrediction]
    model: ModelRef
    backend: str
    device: str
    mode: Literal["mc", "deterministic"]
    samples: int | None
    seed: int | None
    uncertainty_computed: bool
    warnings: list[str] = []


class ModelVersionStatus(BaseModel):
    version: str
    ready: bool
    reason: str | None = None


class ModelSummary(BaseModel):
    name: str
    task: str | None
    versions: list[ModelVersionStatus]
    ready: bool


class ModelList(BaseModel):
    models: list[ModelSummary]


class ModelMetadata(BaseModel):
    """GET /v1/models/{name}: the manifest's public part plus what serves it."""

    model_config = ConfigDict(extra="allow")

    name: str
    version: str
    versions: list[str]
    digest: str
    task: Literal["classification", "regression"]
    intended_use: str
    inputs: dict[str, Any] = Field(description="shape, feature names, units, valid/training ranges")
    outputs: dict[str, Any] = Field(description="labels (classification) or target and unit")
    defaults: dict[str, Any]
    aleatoric: dict[str, Any]
    training: dict[str, Any]
    calibration: dict[str, Any]
    backend: dict[str, str]
    device: str
    dropout: list[dict[str, Any]]
    mc: dict[str, Any] = Field(
        description="dropout_sites: the default ('all' or k, the last k sites), the number of "
        "sites and what a request may ask for"
    )
