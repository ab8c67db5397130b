"""The paired bootstrap behind the dropout-sites comparison (bench/medical_abstracts.py)."""

from __future__ import annotations

import numpy as np

from bench.medical_abstracts import _paired_bootstrap
from service.calibration import metrics


def test_same_setting_differs_by_nothing() -> None:
    rng = np.random.default_rng(0)
    err = (rng.random(200) < 0.4).astype(float)
    unc = {"s": rng.random(200)}
    d = _paired_bootstrap((err, unc), (err, unc), reps=50)["s"]
    for m in ("auroc", "aurc"):
        assert d[m]["difference"] == 0 and d[m]["bootstrap_se"] == 0 and d[m]["ci95"] == [0, 0]


def test_a_better_score_is_found_better_by_many_standard_errors() -> None:
    """Same errors; a's score separates them perfectly, b's is noise: AUROC 1 against about 0.5,
    so the difference is the full-sample one and lies far outside its bootstrap spread."""
    rng = np.random.default_rng(1)
    err = (rng.random(300) < 0.4).astype(float)
    good, noise = {"s": err + 0.1 * rng.random(300)}, {"s": rng.random(300)}
    d = _paired_bootstrap((err, good), (err, noise), reps=200)["s"]
    want = 1.0 - metrics.auroc(noise["s"], err > 0)
    assert d["auroc"]["difference"] == want
    assert d["auroc"]["difference"] > 5 * d["auroc"]["bootstrap_se"]
    lo, hi = d["auroc"]["ci95"]
    assert lo <= want <= hi
    assert d["aurc"]["difference"] < 0  # a perfect ranking has the lower risk-coverage area
