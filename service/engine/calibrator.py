"""A bundle's calibration and referral policy, applied to the summaries the engine serves.

The engine (`ServedModel.summarize`) asks this object for the calibrated logits (temperature,
or vector scaling's per-class scale and bias: `logits`, `classify`), conformal intervals,
prediction sets, their warnings and the referral of a batch. Shapes are batch-first, as in the
summaries: regression ``mean``/``std`` ``[B, 1]``, classification ``probabilities`` ``[B, K]``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from statistics import NormalDist
from typing import Any

import numpy as np

from service.bundle.calibration import Calibration, ReferralPolicy
from service.bundle.manifest import Manifest
from service.engine import conformal, scaling
from service.engine.familiar import Familiarity
from service.engine.referral import (
    Referral,
    assess,
    outside_training,
    relative_width,
    unfamiliar_text,
)
from service.engine.referral import with_overrides as _with_overrides
from service.engine.summaries import (
    ClassificationSummary,
    Interval,
    PredictionSet,
    RegressionSummary,
    level_text,
    summarize_classification,
)

log = logging.getLogger("mcserve.referral")


class Calibrator:
    def __init__(
        self,
        manifest: Manifest,
        referral_overrides: Mapping[str, Any] | None = None,
        familiarity: Familiarity | None = None,
    ):
        self.manifest = manifest
        self.familiarity = familiarity  # text models with a word list
        self.calibration = manifest.calibration
        base = manifest.referral or ReferralPolicy(level=manifest.defaults.confidence)
        self.policy = _with_overrides(base, referral_overrides)
        # An operator's setting is by model name: it reaches every version and task of that
        # name, so one that cannot apply here is dropped with a warning, never silently (the
        # manifest refuses unfamiliar_words without a word list).
        for name, why in _inapplicable(manifest, familiarity):
            if getattr(self.policy, name) is not None:
                log.warning(
                    "%s %s: the referral setting %s is ignored: %s",
                    manifest.name,
                    manifest.version,
                    name,
                    why,
                )
                self.policy = self.policy.model_copy(update={name: None})
        cal = self.calibration
        self._scores = np.asarray(cal.scores, dtype=np.float64) if cal else np.zeros(0)
        self.targets = manifest.outputs.target_names  # regression, in output order
        # One sorted score array per regression target (a single target: `scores`).
        per = cal.target_scores if cal is not None else None
        self._target_scores = (
            [np.asarray(per[t], dtype=np.float64) for t in self.targets] if per else [self._scores]
        )

    @property
    def calibrated(self) -> bool:
        return self.calibration is not None

    @property
    def temperature(self) -> float:
        t = self.calibration.temperature if self.calibration else None
        return t if t is not None else 1.0

    @property
    def class_scale(self) -> np.ndarray | None:
        """Vector scaling's per-class scale [K] (None: temperature scaling only)."""
        cal = self.calibration
        return None if cal is None or cal.class_scale is None else np.asarray(cal.class_scale)

    @property
    def class_bias(self) -> np.ndarray | None:
        cal = self.calibration
        return None if cal is None or cal.class_bias is None else np.asarray(cal.class_bias)

    def logits(self, z: np.ndarray) -> np.ndarray:
        """A classifier's calibrated logits [..., K] from raw ones (`scaling.calibrated_logits`)."""
        return scaling.calibrated_logits(z, self.temperature, self.class_scale, self.class_bias)

    def classify(self, logits: np.ndarray, levels: Sequence[float]) -> ClassificationSummary:
        """The served summary of raw logits [T, B, K], through this bundle's calibration."""
        return summarize_classification(
            logits,
            levels=levels,
            temperature=self.temperature,
            class_scale=self.class_scale,
            class_bias=self.class_bias,
        )

    def q(self, level: float) -> float:
        """The conformal threshold at ``level`` (inf when the calibration set is too small);
        a multi-output regressor's first target (`qs` has them all)."""
        return conformal.quantile(self._target_scores[0], level)

    def qs(self, level: float) -> list[float]:
        """Each regression target's conformal threshold at ``level``, in output order."""
        return [conformal.quantile(s, level) for s in self._target_scores]

    def intervals(self, s: RegressionSummary, levels: Sequence[float]) -> tuple[Interval, ...]:
        """Conformal intervals mean -+ q std at each level, q per target."""
        out = []
        for level in levels:
            qs = self.qs(level)
            if len(qs) == 1:
                lo, hi = conformal.interval(s.mean, s.std, qs[0])
            else:
                cols = [conformal.interval(s.mean[:, d], s.std[:, d], q) for d, q in enumerate(qs)]
                lo = np.stack([c[0] for c in cols], axis=1)
                hi = np.stack([c[1] for c in cols], axis=1)
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
                    f"the conformal {what} at {level_text(level)} {every}: the calibration set "
                    f"has n={cal.n} scores, a finite threshold needs n >= "
                    f"{conformal.min_n(level)}"
                )
        return out

    def referral(self, s: RegressionSummary | ClassificationSummary, x: np.ndarray) -> Referral:
        """Who should see a human: policy triggers on the summary and the inputs [B, ...].

        The set and width triggers read the policy's own set or interval, at the level their
        thresholds were derived at, whatever level the request shows (a classifier's had read
        the request's first level: at 50 % sets, 47 % of digits' test rows were referred
        against the 10 % the policy was fitted to; a regressor's 50 % intervals escaped it);
        their reasons name that level."""
        p = self.policy
        outside = self.outside(x, p.unfamiliar_words)
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
        return self._regression_referral(s, outside)

    def outside(self, x: np.ndarray, unfamiliar: float | None) -> list[list[str]]:
        """Per input [B, ...]: why it lies outside what the model was trained on (features out
        of their training ranges; for text, unfamiliar words above the ``unfamiliar`` share)."""
        f = self.familiarity
        if f is not None:
            if unfamiliar is None:  # the check is off: no words to read
                return [[] for _ in range(x.shape[0])]
            return unfamiliar_text(*f.counts(x), unfamiliar, f.min_texts)
        flat = np.asarray(x, dtype=np.float64).reshape(x.shape[0], -1)
        return outside_training(flat, self.manifest.inputs)

    def _regression_referral(self, s: RegressionSummary, outside: list[list[str]]) -> Referral:
        p = self.policy
        # The width the client would see at the policy's level: conformal once calibrated.
        z = NormalDist().inv_cdf(0.5 + p.level / 2.0)
        factors = self.qs(p.level) if self.calibrated else [z] * len(self.targets)
        if len(self.targets) == 1:
            half = factors[0] * np.maximum(s.std[:, 0], conformal.STD_FLOOR)
            return assess(
                p,
                epistemic=s.epistemic_std[:, 0],
                epistemic_name="epistemic std",
                outside=outside,
                relative_width=relative_width(s.mean[:, 0], half),
                aleatoric=s.aleatoric_std[:, 0],
            )
        # Several targets: each has its own thresholds, in its own units; the reasons name it.
        b = len(outside)
        reasons: list[list[str]] = [[] for _ in range(b)]
        triggers: list[list[str]] = [[] for _ in range(b)]
        for d, name in enumerate(self.targets):
            t = (p.targets or {}).get(name)
            if t is None:
                continue
            half = factors[d] * np.maximum(s.std[:, d], conformal.STD_FLOOR)
            one = assess(
                ReferralPolicy(level=p.level, extrapolation=False, **t.model_dump()),
                epistemic=s.epistemic_std[:, d],
                epistemic_name="epistemic std",
                outside=[[] for _ in range(b)],
                relative_width=relative_width(s.mean[:, d], half),
                aleatoric=s.aleatoric_std[:, d],
            )
            for i in range(b):
                reasons[i].extend(f"target '{name}': {r}" for r in one.reasons[i])
                triggers[i].extend(one.triggers[i])
        ext = assess(
            ReferralPolicy(level=p.level, extrapolation=p.extrapolation),
            epistemic=np.zeros(b),
            epistemic_name="epistemic std",
            outside=outside,
        )
        for i in range(b):
            reasons[i].extend(ext.reasons[i])
            triggers[i].extend(ext.triggers[i])
        refer = np.array([bool(r) for r in reasons], dtype=bool)
        return Referral(refer, reasons, ext.extrapolation, triggers)

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
        } | _vector(cal)


def _vector(cal: Calibration) -> dict[str, Any]:
    """Vector scaling's fields, only when the bundle has them (others' metadata keeps its bytes)."""
    out: dict[str, Any] = {}
    if cal.class_scale is not None:
        out |= {"class_scale": cal.class_scale, "class_bias": cal.class_bias}
    if cal.fit:
        out["fit"] = cal.fit
    return out


def _inapplicable(manifest: Manifest, familiarity: Familiarity | None) -> list[tuple[str, str]]:
    """The referral thresholds a model cannot use, each with the reason."""
    if manifest.task == "classification":
        out = [(f, "it is for regressors") for f in ("aleatoric", "relative_width")]
    else:
        out = [("max_set_size", "it is for classifiers")]
    if familiarity is None:
        out.append(("unfamiliar_words", "this version has no word list (inputs.text.words)"))
    return out
