"""Referral: flag predictions a human should look at, each with the reasons in words.

Triggers (each off when its threshold is null, see `ReferralPolicy` in the manifest):
epistemic uncertainty (mutual information for classifiers, epistemic std for regressors) above a
threshold; a regressor's aleatoric std (the noise it expects for this input: the model does not
doubt itself, the outcome is just noisy) above a threshold; a regression interval wide relative
to the prediction; a classification prediction set with more labels than allowed, or none; an
input outside the training ranges (extrapolation: a soft signal, unlike the hard valid range that
refuses the request). Arrays are batch-first (``[B]``), so a batch's referral can be cut per
request like any summary.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.bundle.calibration import ReferralPolicy
from service.bundle.spec import InputSpec
from service.engine.summaries import level_text


@dataclass(frozen=True)
class Referral:
    refer: np.ndarray  # [B] bool: a human should look at this prediction
    reasons: list[list[str]]  # per input, human-readable; empty when refer is False
    extrapolation: np.ndarray  # [B] bool: some feature lies outside the training range
    triggers: list[list[str]]  # per input, machine-readable: one of TRIGGERS per reason


TRIGGERS = ("epistemic", "aleatoric", "interval_width", "prediction_set", "extrapolation")


def _num(v: float) -> str:
    return f"{v:.3g}"


def _pct(share: float) -> str:
    return f"{share * 100:.3g} %"


def outside_training(flat: np.ndarray, spec: InputSpec) -> list[list[str]]:
    """Per input [B, F]: one sentence per feature outside ``spec.training_ranges``."""
    if not spec.training_ranges:
        return [[] for _ in range(flat.shape[0])]
    lo = np.array([r[0] for r in spec.training_ranges])
    hi = np.array([r[1] for r in spec.training_ranges])
    out = (flat < lo) | (flat > hi)
    names = spec.feature_names
    reasons: list[list[str]] = [[] for _ in range(flat.shape[0])]
    # Sentences only for the inputs that need them: this runs on the compute thread per batch.
    for i in np.flatnonzero(out.any(axis=1)):
        for j in np.flatnonzero(out[i]):
            what = f"feature '{names[j]}'" if names else f"element {j}"
            reasons[i].append(
                f"{what} = {_num(flat[i, j])} outside the training range "
                f"[{_num(lo[j])}, {_num(hi[j])}]"
            )
    return reasons


def unfamiliar_text(
    strange: np.ndarray, total: np.ndarray, threshold: float | None, min_texts: int
) -> list[list[str]]:
    """Per text: one sentence when its unfamiliar share of words (`Familiarity.counts`) is above
    ``threshold`` (None: never); ``min_texts`` as the word list was made."""
    reasons: list[list[str]] = [[] for _ in range(len(total))]
    if threshold is None:
        return reasons
    for i, (s, n) in enumerate(zip(strange.tolist(), total.tolist(), strict=True)):
        share = s / n if n else 1.0
        if share > threshold:
            what = (
                f"{s} of its {n} words ({_pct(share)}) are" if n else "it has no word, so 100 % is"
            )
            reasons[i].append(
                f"unfamiliar text: {what} outside the model's word list (the words of at least "
                f"{min_texts} training texts), above the threshold {_pct(threshold)}; it may "
                "not be the kind of text this model was trained on"
            )
    return reasons


def assess(
    policy: ReferralPolicy,
    *,
    epistemic: np.ndarray,
    epistemic_name: str,
    outside: list[list[str]],
    relative_width: np.ndarray | None = None,
    set_size: np.ndarray | None = None,
    aleatoric: np.ndarray | None = None,
) -> Referral:
    """Apply ``policy`` to per-input scores [B]; ``outside`` from `outside_training`."""
    b = len(outside)
    reasons: list[list[str]] = [[] for _ in range(b)]
    triggers: list[list[str]] = [[] for _ in range(b)]
    level = f"{level_text(policy.level * 100)} %"  # 99.99999 %, not 100 %
    for i in range(b):
        e = float(epistemic[i])
        if policy.epistemic is not None and e > policy.epistemic:
            triggers[i].append("epistemic")
            reasons[i].append(
                f"{epistemic_name} {_num(e)} above the threshold {_num(policy.epistemic)}"
            )
        if aleatoric is not None and policy.aleatoric is not None:
            a = float(aleatoric[i])
            if a > policy.aleatoric:
                triggers[i].append("aleatoric")
                reasons[i].append(
                    f"aleatoric std {_num(a)} (the noise expected for this input) above the "
                    f"threshold {_num(policy.aleatoric)}"
                )
        if relative_width is not None and policy.relative_width is not None:
            w = float(relative_width[i])
            if w > policy.relative_width:
                size = f"{_pct(w)} of the predicted value" if np.isfinite(w) else "unbounded"
                triggers[i].append("interval_width")
                reasons[i].append(
                    f"the {level} interval width is {size}, above the threshold "
                    f"{_pct(policy.relative_width)}"
                )
        if set_size is not None and policy.max_set_size is not None:
            n = int(set_size[i])
            if n == 0 or n > policy.max_set_size:
                triggers[i].append("prediction_set")
            if n == 0:
                reasons[i].append(f"the {level} prediction set is empty: no label is plausible")
            elif n > policy.max_set_size:
                reasons[i].append(
                    f"the {level} prediction set holds {n} labels, more than {policy.max_set_size}"
                )
        if policy.extrapolation:
            reasons[i].extend(outside[i])
            triggers[i].extend("extrapolation" for _ in outside[i])
    extrapolation = np.array([bool(o) for o in outside], dtype=bool)
    refer = np.array([bool(r) for r in reasons], dtype=bool)
    return Referral(refer, reasons, extrapolation, triggers)


def relative_width(mean: np.ndarray, half_width: np.ndarray) -> np.ndarray:
    """Interval width / |mean| per input (inf for a zero mean or an unbounded interval)."""
    m = np.abs(np.asarray(mean, dtype=np.float64))
    w = 2.0 * np.asarray(half_width, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(m > 0, w / np.where(m > 0, m, 1.0), np.inf)
    return np.asarray(out)


def with_overrides(policy: ReferralPolicy, overrides: Mapping[str, Any] | None) -> ReferralPolicy:
    """The manifest's policy with an operator's settings on top (validated like the manifest)."""
    if not overrides:
        return policy
    return ReferralPolicy.model_validate({**policy.model_dump(), **dict(overrides)})


def budget_threshold(scores: np.ndarray, referred: np.ndarray, rate: float) -> float:
    """The threshold on ``scores`` [N] (a trigger fires above it) at which the rows that other
    triggers do not refer (``referred`` [N] bool) bring the share referred up to ``rate``: the
    highest-scoring of them are added. The largest score when the others already refer that
    share: then this trigger fires on none of these rows, only above anything they showed."""
    values = np.asarray(scores, dtype=np.float64)
    need = round(rate * len(values)) - int(np.count_nonzero(referred))
    free = np.sort(values[~np.asarray(referred, dtype=bool)])[::-1]  # descending
    if need <= 0 or free.size == 0:
        return float(values.max())
    if need >= free.size:
        return 0.0
    return float(free[need])  # exactly the `need` largest lie above it (ties aside)
