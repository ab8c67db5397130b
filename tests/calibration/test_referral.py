"""Referral: each trigger with its reason in words, the extrapolation flag, overrides."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from calib_repo import Repo

from service.bundle import load_bundle
from service.bundle.calibration import ReferralPolicy
from service.bundle.spec import InputSpec
from service.engine.model import ServedModel
from service.engine.params import PredictParams
from service.engine.referral import (
    assess,
    budget_threshold,
    outside_training,
    relative_width,
    with_overrides,
)
from service.errors import BundleError

SPEC = InputSpec(
    shape=[2],
    feature_names=["bmi", "age"],
    training_ranges=[(18.0, 42.0), (20.0, 80.0)],
)


def test_extrapolation_reasons_name_the_feature_value_and_range() -> None:
    flat = np.array([[30.0, 50.0], [45.1, 50.0], [10.0, 90.0]])
    assert outside_training(flat, SPEC) == [
        [],
        ["feature 'bmi' = 45.1 outside the training range [18, 42]"],
        [
            "feature 'bmi' = 10 outside the training range [18, 42]",
            "feature 'age' = 90 outside the training range [20, 80]",
        ],
    ]
    nameless = InputSpec(shape=[1], training_ranges=[(0.0, 1.0)])
    assert outside_training(np.array([[2.0]]), nameless) == [
        ["element 0 = 2 outside the training range [0, 1]"]
    ]
    assert outside_training(flat, InputSpec(shape=[2])) == [[], [], []]


def test_epistemic_trigger_classifier() -> None:
    policy = ReferralPolicy(epistemic=0.25)
    r = assess(
        policy,
        epistemic=np.array([0.41, 0.1]),
        epistemic_name="mutual information",
        outside=[[], []],
    )
    assert r.refer.tolist() == [True, False]
    assert r.reasons == [["mutual information 0.41 above the threshold 0.25"], []]
    assert r.triggers == [["epistemic"], []]


def test_relative_width_trigger_regression() -> None:
    policy = ReferralPolicy(level=0.9, relative_width=0.5)
    widths = relative_width(np.array([100.0, 10.0, 0.0]), np.array([10.0, 10.0, 1.0]))
    assert widths.tolist() == [0.2, 2.0, np.inf]
    r = assess(
        policy,
        epistemic=np.zeros(3),
        epistemic_name="epistemic std",
        outside=[[], [], []],
        relative_width=widths,
    )
    assert r.reasons == [
        [],
        ["the 90 % interval width is 200 % of the predicted value, above the threshold 50 %"],
        ["the 90 % interval width is unbounded, above the threshold 50 %"],
    ]
    assert r.triggers[1] == ["interval_width"]


def test_prediction_set_trigger() -> None:
    policy = ReferralPolicy(max_set_size=1)
    r = assess(
        policy,
        epistemic=np.zeros(3),
        epistemic_name="mutual information",
        outside=[[], [], []],
        set_size=np.array([1, 3, 0]),
    )
    assert r.reasons == [
        [],
        ["the 95 % prediction set holds 3 labels, more than 1"],
        ["the 95 % prediction set is empty: no label is plausible"],
    ]
    assert r.triggers == [[], ["prediction_set"], ["prediction_set"]]


def test_extrapolation_flag_refers_unless_switched_off() -> None:
    outside = outside_training(np.array([[45.1, 50.0], [30.0, 50.0]]), SPEC)
    kw = {"epistemic": np.zeros(2), "epistemic_name": "epistemic std", "outside": outside}
    r = assess(ReferralPolicy(), **kw)  # type: ignore[arg-type]
    assert r.refer.tolist() == [True, False] and r.extrapolation.tolist() == [True, False]
    assert r.triggers[0] == ["extrapolation"]
    quiet = assess(ReferralPolicy(extrapolation=False), **kw)  # type: ignore[arg-type]
    # Switched off as a trigger, the flag is still reported.
    assert quiet.refer.tolist() == [False, False] and quiet.extrapolation.tolist() == [True, False]
    assert quiet.reasons == [[], []]


def test_thresholds_left_out_never_trigger() -> None:
    r = assess(
        ReferralPolicy(extrapolation=False),
        epistemic=np.array([1e9]),
        epistemic_name="epistemic std",
        outside=[[]],
        relative_width=np.array([np.inf]),
        set_size=np.array([0]),
    )
    assert not r.refer.any() and r.reasons == [[]]


def test_overrides() -> None:
    base = ReferralPolicy(epistemic=0.2, max_set_size=1)
    over = with_overrides(base, {"epistemic": 0.5, "extrapolation": False})
    assert (over.epistemic, over.max_set_size, over.extrapolation) == (0.5, 1, False)
    assert with_overrides(base, None) is base
    with pytest.raises(ValueError, match="epistemic"):
        with_overrides(base, {"epistemic": -1})


def test_served_model_applies_policy_and_settings_override(calibrated: Repo) -> None:
    bundle = load_bundle(calibrated.root / "reg" / "2")
    policy = bundle.manifest.referral
    assert policy is not None and policy.epistemic is not None and policy.relative_width
    assert "together refer 10 % (100 - percentile 90) of the 60 calibration rows" in (
        policy.derived_from or ""
    )
    x = np.array([[0.0, 0.0, 0.0], [5.0, 0.0, 0.0]], dtype=np.float32)
    params = PredictParams(samples=50, confidence=(0.9,), seed=1)
    pred = ServedModel(bundle).predict(x, params)
    assert pred.referral is not None
    assert pred.referral.extrapolation.tolist() == [False, True]
    assert "feature 'x0' = 5 outside the training range [-2, 2]" in pred.referral.reasons[1]
    # An operator who trusts extrapolation and has huge thresholds gets no referral at all.
    lax = {"reg": {"epistemic": 1e9, "relative_width": 1e9, "extrapolation": False}}
    pred = ServedModel(bundle, referral_overrides=lax).predict(x, params)
    assert pred.referral is not None and not pred.referral.refer.any()
    assert pred.referral.extrapolation.tolist() == [False, True]
    with pytest.raises(BundleError, match="referral override for 'reg' is invalid"):
        ServedModel(bundle, referral_overrides={"reg": {"max_set_size": 0}})


def test_budget_threshold_adds_the_highest_scores_the_others_leave() -> None:
    scores = np.arange(10.0)  # 0..9
    others = np.zeros(10, dtype=bool)
    t = budget_threshold(scores, others, 0.3)
    assert t == 6.0 and list(np.flatnonzero(scores > t)) == [7, 8, 9]
    others[[9, 0]] = True  # rows 9 and 0 referred already: one more, the highest left
    t = budget_threshold(scores, others, 0.3)
    assert list(np.flatnonzero((scores > t) & ~others)) == [8]
    others[[1, 2]] = True  # the others already refer 4 of 10: this trigger adds none
    assert budget_threshold(scores, others, 0.3) == 9.0


def test_training_ranges_that_refer_most_rows_are_said_and_warned(tmp_path: Path) -> None:
    """Per-value ranges narrower than the data (an audio model's, from its training clips)
    referred 73 % of in-distribution rows; the policy's record said "the triggers together
    refer 10 %" and calibrate said nothing."""
    import torch
    from calib_repo import CLF_FEATURES, write_csv
    from nets import mlp

    from service.calibration.recalibration import calibrate_bundle
    from service.packaging import save

    torch.manual_seed(0)
    save(mlp(0.25, d_in=4, hidden=16, d_out=3), torch.randn(4, 4), out_dir=tmp_path, name="clf",
         version="1", task="classification", intended_use="t", labels=["a", "b", "c"],
         feature_names=CLF_FEATURES, training_ranges=[(-0.5, 0.5)] * 4)  # fmt: skip
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 4)).round(3)
    write_csv(tmp_path / "cal.csv", CLF_FEATURES, x, rng.integers(0, 3, 60))
    share = float((np.abs(x) > 0.5).any(axis=1).mean())  # rows with a value outside its range
    assert share > 0.5
    result = calibrate_bundle(tmp_path / "clf" / "1", tmp_path / "cal.csv", tmp_path, samples=20)
    said = f"extrapolation alone refers {100 * share:.3g} % of the 60 calibration rows"
    assert result.manifest.referral is not None
    assert (result.manifest.referral.derived_from or "").startswith(said)
    assert any(w.startswith(said) and "MCSERVE_REFERRAL" in w for w in result.warnings)
    # Following the advice (extrapolation off) leaves a policy that refers its share of the
    # calibration rows at the calibration's passes and seed: counted in, the other triggers
    # had been left nothing, and it referred no one (review R15).
    lax = {"clf": {"extrapolation": False}}
    served = ServedModel(load_bundle(result.path), referral_overrides=lax)
    pred = served.predict(x.astype(np.float32), PredictParams(20, (0.95,), seed=0))
    assert pred.referral is not None
    # The same rows, passes and seed as the calibration: the thresholds' own count, 10 % of 60.
    assert int(pred.referral.refer.sum()) == 6
