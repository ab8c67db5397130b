"""A bundle's calibration and referral policy, applied to the summaries the engine serves.

The engine (`ServedModel.summarize`) asks this object for the temperature, conformal intervals,
prediction sets, their warnings and the referral of a batch. Shapes are batch-first, as in the
summaries: regression ``mean``/``std`` ``[B, 1]``, classification ``probabilities`` ``[B, K]``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from statistics import NormalDist
from typing import Any

import numpy as np

from service.bundle.manifest import Manifest, ReferralPolicy
from service.calibration import conformal
from service.calibration.referral import Referral, assess, outside_training, relative_width
from service.calibration.referral import with_overrides as _with_overrides
from service.engine.summaries import (
    ClassificationSummary,
    Interval,
    PredictionSet,
    RegressionSummary,
)


class Calibrator:
    def __init__(self, manifest: Manifest, referral_overrides: Mapping[str, Any] | None = None):
        self.manifest = manifest
        self.calibration = manifest.calibration
        base = manifest.referral or ReferralPolicy(level=manifest.defaults.confidence)
        self.policy = _with_overrides(base, referral_overrides)
        cal = self.calibration
        self._scores = np.asarray(cal.scores, dtype=np.float64) if cal else np.zeros(0)

    @property
    def calibrated(self) -> bool:
        return self.calibration is not None

    @property
    def temperature(self) -> float:
        t = self.calibration.temperature if self.calibration else None
        return t if t is not None else 1.0

    def q(self, level: float) -> float:
        """The conformal threshold at ``level`` (inf when the calibration set is too small)."""
        return conformal.quantile(self._scores, level)

    def intervals(self, s: RegressionSummary, levels: Sequence[float]) -> tuple[Interval, ...]:
        """Conformal intervals mean -+ q std at each level."""
        out = []
        for level in levels:
            lo, hi = conformal.interval(s.mean, s.std, self.q(level))
            out.append(Interval(level, "conformal", lo, hi))
        return tuple(out)

    def prediction_sets(
        self, probs: np.ndarray, levels: Sequence[float]
    ) -> tuple[PredictionSet, ...]:
        return tuple(
            PredictionSet(level, q, conformal.prediction_set(probs, q))
            for level in levels
            for q in [self.q(level)]
        )

    def warnings(self, samples: int, levels: Sequence[float]) -> list[str]:
        """What limits the conformal guarantee of this request (depends on parameters only)."""
        cal = self.calibration
        if cal is None:
            return []
        out = []
        what = "interval" if self.manifest.task == "regression" else "prediction set"
        if samples < cal.samples:
            out.append(
                f"conformal {what}s: the coverage guarantee assumes {cal.samples} passes, as used "
                f"at calibration; this request used {samples} (ask for samples >= {cal.samples})"
            )
        for level in levels:
            if math.isinf(self.q(level)):
                every = "is unbounded" if what == "interval" else "holds every label"
                out.append(
                    f"the conformal {what} at {level:g} {every}: the calibration set has "
                    f"n={cal.n} scores, a finite threshold needs n >= {conformal.min_n(level)}"
                )
        return out

    def referral(self, s: RegressionSummary | ClassificationSummary, x: np.ndarray) -> Referral:
        """Who should see a human: policy triggers on the summary and the inputs [B, ...]."""
        flat = np.asarray(x, dtype=np.float64).reshape(x.shape[0], -1)
        outside = outside_training(flat, self.manifest.inputs)
        p = self.policy
        if isinstance(s, ClassificationSummary):
            sizes = None
            if self.calibrated and p.max_set_size is not None:
                sizes = conformal.prediction_set(s.probabilities, self.q(p.level)).sum(axis=1)
            return assess(
                p,
                epistemic=s.mutual_information,
                epistemic_name="mutual information",
                outside=outside,
                set_size=sizes,
            )
        # The width the client would see at the policy's level: conformal once calibrated.
        z = NormalDist().inv_cdf(0.5 + p.level / 2.0)
        factor = self.q(p.level) if self.calibrated else z
        half = factor * np.maximum(s.std[:, 0], conformal.STD_FLOOR)
        return assess(
            p,
            epistemic=s.epistemic_std[:, 0],
            epistemic_name="epistemic std",
            outside=outside,
            relative_width=relative_width(s.mean[:, 0], half),
            aleatoric=s.aleatoric_std[:, 0],
        )

    def metadata(self) -> dict[str, Any]:
        """The calibration status for model metadata (the scores themselves stay in the bundle)."""
        cal = self.calibration
        if cal is None:
            return {"calibrated": False}
        return {
            "calibrated": True,
            "method": cal.method,
            "score": cal.score,
            "n": cal.n,
            "samples": cal.samples,
            "seed": cal.seed,
            "temperature": cal.temperature,
            "source": cal.source,
            "data": cal.data,
            "temperature_fit": cal.temperature_fit,
        }
