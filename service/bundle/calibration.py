"""The calibration and referral sections of a bundle manifest (`manifest.json`), written by
`service calibrate`: split-conformal scores, the classifier's temperature or vector scaling, and
the policy that says when a prediction should go to a human. `manifest.py` holds the rest."""

from __future__ import annotations

import itertools
import math
from typing import Any, Literal

from pydantic import (
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)

from service.bundle.spec import Strict


class Calibration(Strict):
    """Split-conformal calibration of one bundle version, written by `service calibrate`.

    Regression scores are |y - mean| / std (std the total predictive std of the MC summary);
    classification scores are 1 - p_y with the calibrated MC probabilities, the mean over passes
    of softmax((z / temperature) * class_scale + class_bias) (scale and bias only with vector
    scaling; service/engine/scaling.py). All n scores are kept, sorted, so that any level can be
    served (q = the ceil((n+1) level)-th).
    """

    # Its numbers are checked below, with messages that name the fix (Strict's would not).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=True)

    method: Literal["split-conformal"] = "split-conformal"
    score: Literal["abs-residual-over-std", "one-minus-probability"]
    n: int = Field(ge=1)
    samples: int = Field(ge=2)  # MC passes used at calibration: the guarantee assumes as many
    seed: int = Field(ge=0)
    scores: list[float]
    # Multi-output regressors: each target's sorted scores, by target name (`scores` is then []).
    target_scores: dict[str, list[float]] | None = None
    temperature: float | None = Field(default=None, gt=0.0)  # classification only
    # Classifiers: calibration-set NLL at T = 1 and at the chosen T, and the plain NLL minimiser.
    temperature_fit: dict[str, float | str] = Field(default_factory=dict)
    # Vector scaling (classifiers, docs/BUNDLES.md): per-class scale (> 0) and bias on the
    # logits divided by the temperature, one per class in outputs.labels order; both or neither.
    class_scale: list[float] | None = None
    class_bias: list[float] | None = None
    # How the method was chosen (`calibrate --method vector|auto`): the cross-validated NLLs.
    fit: dict[str, float | str] = Field(default_factory=dict)
    data: dict[str, Any] = Field(default_factory=dict)  # file name, sha256 and rows used
    source: dict[str, str] = Field(default_factory=dict)  # version and digest calibrated from
    row_fingerprints: list[str] = Field(default_factory=list)  # of the calibration rows

    @model_validator(mode="after")
    def _scores(self) -> Calibration:
        lists = {"scores": self.scores}
        if self.target_scores is not None:
            if self.scores:
                raise ValueError("calibration.scores is [] when target_scores holds them")
            lists = {f"target_scores.{k}": v for k, v in self.target_scores.items()}
        for where, scores in lists.items():
            if len(scores) != self.n:
                raise ValueError(f"calibration.{where} has {len(scores)} entries for n={self.n}")
            if any(not (a <= b) for a, b in itertools.pairwise(scores)):
                raise ValueError(f"calibration.{where} must be sorted ascending")
            if any(not (0.0 <= s < float("inf")) for s in scores):
                raise ValueError(f"calibration.{where} must be finite and >= 0")
        if (self.score == "one-minus-probability") != (self.temperature is not None):
            raise ValueError("calibration.temperature is required for (and only for) classifiers")
        if self.temperature is not None and not math.isfinite(self.temperature):
            raise ValueError(
                f"calibration.temperature must be a finite number > 0 (got {self.temperature}); "
                "calibrate again (`service calibrate`)"
            )
        for name, record in (("temperature_fit", self.temperature_fit), ("fit", self.fit)):
            bad = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
            if bad:
                raise ValueError(
                    f"calibration.{name}.{bad[0]} is {record[bad[0]]}; the fit's record holds "
                    "finite numbers (a fit that diverged writes no calibration)"
                )
        self._vector()
        return self

    def _vector(self) -> None:
        scale, bias = self.class_scale, self.class_bias
        if scale is None and bias is None:
            return
        if scale is None or bias is None:
            given, missing = ("class_scale", "class_bias")[:: 1 if bias is None else -1]
            raise ValueError(
                f"calibration.{given} needs calibration.{missing} (vector scaling has both, one "
                "per class); add it or remove both for temperature scaling"
            )
        if self.score != "one-minus-probability":
            raise ValueError(
                "calibration.class_scale and class_bias are vector scaling of a classifier's "
                "logits; remove them from a regressor's calibration"
            )
        if len(scale) != len(bias):
            raise ValueError(
                f"calibration.class_scale has {len(scale)} values and class_bias {len(bias)}; "
                "give one of each per class"
            )
        if not all(math.isfinite(v) and v > 0 for v in scale):
            raise ValueError(
                f"calibration.class_scale must be finite and > 0 (got {scale}); refit with "
                "`service calibrate --method vector`"
            )
        if not all(math.isfinite(v) for v in bias):
            raise ValueError(
                f"calibration.class_bias must be finite (got {bias}); refit with "
                "`service calibrate --method vector`"
            )

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        out: dict[str, Any] = handler(self)
        # Temperature-only calibrations keep their bytes: the vector fields appear when used.
        for key in ("class_scale", "class_bias"):
            if out.get(key) is None:
                out.pop(key, None)
        if not out.get("fit"):
            out.pop("fit", None)
        return out


class TargetReferral(Strict):
    """One target's referral thresholds (a multi-output regressor); null never triggers."""

    epistemic: float | None = Field(default=None, ge=0.0)
    aleatoric: float | None = Field(default=None, ge=0.0)
    relative_width: float | None = Field(default=None, gt=0.0)


class ReferralPolicy(Strict):
    """When a prediction should go to a human. A threshold left out (null) never triggers."""

    level: float = Field(default=0.95, gt=0.0, lt=1.0)  # of the interval/set the triggers read
    # Mutual information (nats) for classifiers, epistemic std (target units) for regressors.
    epistemic: float | None = Field(default=None, ge=0.0)
    # Regression: aleatoric std (target units), the noise the model expects for this input.
    aleatoric: float | None = Field(default=None, ge=0.0)
    relative_width: float | None = Field(default=None, gt=0.0)  # regression: width / |mean|
    max_set_size: int | None = Field(default=None, ge=1)  # classification; an empty set refers
    extrapolation: bool = True  # refer when a feature lies outside inputs.training_ranges
    # Text models with a word list: refer when more than this share of a text's words never
    # appeared in the training texts (an extrapolation reason; off with extrapolation=false).
    unfamiliar_words: float | None = Field(default=None, ge=0.0, le=1.0)
    derived_from: str | None = None  # how the thresholds were chosen
    # Multi-output regressors: each target's thresholds, in its own units (by target name); the
    # epistemic, aleatoric and relative_width above then do not apply.
    targets: dict[str, TargetReferral] | None = None
