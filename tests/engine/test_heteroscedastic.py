"""A regressor with a learned noise head: heads, mixture summaries, log-likelihood, referral and
the bundle (Kendall & Gal 2017; issue 22). Hand-computed cases throughout."""

from __future__ import annotations

import math
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest
import torch
from nets import mlp

from service.bundle import load_bundle
from service.bundle.calibration import ReferralPolicy
from service.bundle.manifest import Aleatoric
from service.calibration.metrics import mixture_log_likelihood
from service.engine import heads
from service.engine.model import ServedModel
from service.engine.params import PredictParams
from service.engine.referral import assess
from service.engine.regression import summarize_regression
from service.errors import BundleError, InvalidInputError, ModelError
from service.packaging import save

LOGVAR = Aleatoric(kind="heteroscedastic", parameterisation="log_variance")
SOFTPLUS = Aleatoric(kind="heteroscedastic", parameterisation="softplus_std")


def test_heads_split_by_parameterisation() -> None:
    # 2 passes x 1 input, outputs [mean, v]. log-variance: s^2 = e^v; softplus: s = ln(1 + e^v).
    raw = np.array([[[1.0, math.log(4.0)]], [[3.0, 0.0]]])
    f, s2 = heads.split(raw, LOGVAR)
    np.testing.assert_array_equal(f, [[[1.0]], [[3.0]]])
    np.testing.assert_allclose(s2, [[[4.0]], [[1.0]]], rtol=1e-15)
    _, s2 = heads.split(raw, SOFTPLUS)
    np.testing.assert_allclose(s2, [[[math.log(1 + 4.0) ** 2]], [[math.log(2.0) ** 2]]])
    # A fixed noise is one number; no noise is None; the raw outputs are the means.
    assert heads.split(raw[..., :1], Aleatoric(kind="homoscedastic", noise_var=0.3))[1] == 0.3
    assert heads.split(raw[..., :1], Aleatoric())[1] is None
    # Softplus does not overflow where exp would; an overflowing log-variance is refused.
    assert np.isfinite(heads.variance(np.array([800.0]), "softplus_std")).all()
    with pytest.raises(InvalidInputError, match="overflows a variance"):
        heads.variance(np.array([800.0]), "log_variance")
    # An input's error, naming the input (a ValueError was a 500 on the adaptive path and a
    # traceback from `calibrate`); a mean over 2^20 passes of e^600 stays finite.
    raw = np.zeros((3, 4, 1))
    raw[1, 2, 0] = 650.0
    with pytest.raises(InvalidInputError, match=r"output 650 for input 2 overflows"):
        heads.variance(raw, "log_variance")
    assert np.isfinite(heads.variance(np.full((1, 1), 600.0), "log_variance").sum() * 2.0**20)


def test_manifest_declares_the_parameterisation() -> None:
    with pytest.raises(ValueError, match="parameterisation"):
        Aleatoric(kind="heteroscedastic")
    with pytest.raises(ValueError, match="parameterisation"):
        Aleatoric(kind="homoscedastic", noise_var=1.0, parameterisation="log_variance")
    with pytest.raises(ValueError, match="learns its noise"):
        Aleatoric(kind="heteroscedastic", parameterisation="log_variance", noise_var=1.0)
    # kind 'none' with a noise_var was served as a fixed noise; 'homoscedastic' needs one
    with pytest.raises(ValueError, match=r"noise_var > 0 is required for, and only for"):
        Aleatoric(kind="none", noise_var=0.5)
    with pytest.raises(ValueError, match=r"noise_var > 0 is required for, and only for"):
        Aleatoric(kind="homoscedastic")


def test_mixture_moments_and_gaussian_interval_by_hand() -> None:
    # Passes: N(0, 1) and N(2, 3). Mixture mean 1; mean of variances 2 -> aleatoric sqrt 2;
    # std of means 1 -> epistemic 1; total variance 1 + 2 = 3 (the mixture's own variance:
    # E[y^2] = (0 + 1 + 4 + 3) / 2 = 4, minus 1^2).
    f = np.array([0.0, 2.0]).reshape(2, 1, 1)
    s2 = np.array([1.0, 3.0]).reshape(2, 1, 1)
    s = summarize_regression(f, levels=[0.95], noise_var=s2)
    assert s.mean[0, 0] == 1.0
    assert s.epistemic_std[0, 0] == 1.0
    assert s.aleatoric_std[0, 0] == pytest.approx(math.sqrt(2.0), abs=1e-15)
    assert s.std[0, 0] == pytest.approx(math.sqrt(3.0), abs=1e-15)
    z = NormalDist().inv_cdf(0.975)
    assert s.intervals[0].lower[0, 0] == pytest.approx(1.0 - z * math.sqrt(3.0), abs=1e-12)
    assert s.intervals[0].upper[0, 0] == pytest.approx(1.0 + z * math.sqrt(3.0), abs=1e-12)


def _mixture_quantile(p: float, comps: list[tuple[float, float]]) -> float:
    """The p-quantile of an equal-weight Gaussian mixture [(mean, std)], by bisection."""
    lo, hi = -100.0, 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        cdf = sum(NormalDist(m, sd).cdf(mid) for m, sd in comps) / len(comps)
        lo, hi = (mid, hi) if cdf < p else (lo, mid)
    return (lo + hi) / 2


def test_quantiles_of_a_two_component_mixture() -> None:
    # 200 passes, half N(0, 1) and half N(4, 0.5^2): a bimodal predictive distribution whose
    # Gaussian interval (mean 2, std ~2.1) is not its quantile interval. The sampled end points
    # must match the exact mixture quantiles within their sampling error: with n draws the
    # p-quantile has sd sqrt(p (1 - p) / n) / density(q); allow 4 of those.
    comps = [(0.0, 1.0), (4.0, 0.5)]
    t = 200
    f = np.array([m for m, _ in comps] * (t // 2)).reshape(t, 1, 1)
    s2 = np.array([sd**2 for _, sd in comps] * (t // 2)).reshape(t, 1, 1)
    levels = [0.8, 0.95]
    a = summarize_regression(
        f, levels=levels, method="quantile", noise_var=s2, rng=np.random.default_rng(11)
    )
    b = summarize_regression(
        f, levels=levels, method="quantile", noise_var=s2, rng=np.random.default_rng(11)
    )
    n = t * heads_draws(t)
    for iv, iv_b, level in zip(a.intervals, b.intervals, levels, strict=True):
        assert iv.method == "quantile"
        # Same generator state, same bytes.
        assert iv.lower.tobytes() == iv_b.lower.tobytes()
        assert iv.upper.tobytes() == iv_b.upper.tobytes()
        for p, got in ((0.5 - level / 2, iv.lower[0, 0]), (0.5 + level / 2, iv.upper[0, 0])):
            q = _mixture_quantile(p, comps)
            density = sum(NormalDist(m, sd).pdf(q) for m, sd in comps) / 2
            se = math.sqrt(p * (1 - p) / n) / density
            assert abs(got - q) < 4 * se, (level, p, got, q, se)
    # By hand: the 80 % interval's upper end solves (Phi(y) + Phi((y - 4) / 0.5)) / 2 = 0.9; with
    # Phi(y) = 1 - 5e-6 there, Phi((y - 4) / 0.5) = 0.8 and y = 4 + 0.5 z_0.8 = 4.4208, whereas
    # the Gaussian interval's end is 2 + z_0.9 * sqrt(4 + 0.625) = 4.756. The sampled end was
    # checked against the exact quantile above, within 4 of its standard errors; here the
    # exact quantile itself, and that such a check tells the two apart.
    by_hand = 4 + 0.5 * NormalDist().inv_cdf(0.8)
    assert _mixture_quantile(0.9, comps) == pytest.approx(by_hand, abs=1e-4)
    gaussian = 2 + NormalDist().inv_cdf(0.9) * math.sqrt(4 + 0.625)
    density = sum(NormalDist(m, sd).pdf(by_hand) for m, sd in comps) / 2
    assert abs(gaussian - by_hand) > 8 * math.sqrt(0.9 * 0.1 / n) / density


def heads_draws(t: int) -> int:
    from service.engine.regression import mixture_draws_per_pass

    return mixture_draws_per_pass(t)


def test_quantile_draws_of_an_input_do_not_depend_on_later_inputs() -> None:
    rng = np.random.default_rng(3)
    f = rng.normal(size=(50, 3, 1))
    s2 = rng.uniform(0.5, 2.0, size=(50, 3, 1))
    whole = summarize_regression(
        f, levels=[0.9], method="quantile", noise_var=s2, rng=np.random.default_rng(5)
    )
    first = summarize_regression(
        f[:, :1], levels=[0.9], method="quantile", noise_var=s2[:, :1], rng=np.random.default_rng(5)
    )
    assert whole.intervals[0].lower[:1].tobytes() == first.intervals[0].lower.tobytes()


def test_mixture_log_likelihood_with_a_variance_that_underflowed() -> None:
    """A pass whose variance underflowed to 0 (softplus_std below -372) is a point mass: zero
    density away from its mean, so the row's likelihood is the other passes' (it was NaN: log 0
    minus d^2 / 0, and one such row made the report's likelihood null)."""
    assert heads.variance(np.array([-400.0]), "softplus_std")[0] == 0.0
    f, y = np.array([[0.0], [0.1]]), np.array([0.05])
    got = mixture_log_likelihood(f, y, np.array([[0.0], [1.0]]))
    one = NormalDist(0.1, 1.0).pdf(0.05) / 2.0  # the other pass's density, weight 1/2
    np.testing.assert_allclose(got, [math.log(one)], rtol=1e-12)
    # Every pass a point mass away from y: density 0, log -inf (not NaN); on y: +inf.
    assert mixture_log_likelihood(f, y, np.zeros((2, 1)))[0] == -math.inf
    assert mixture_log_likelihood(f, np.array([0.1]), np.zeros((2, 1)))[0] == math.inf


def test_mixture_log_likelihood_with_learned_variances_by_hand() -> None:
    # y = 1 under the passes N(0, 1) and N(2, 4): (N(1; 0, 1) + N(1; 2, 4)) / 2.
    want = math.log((NormalDist(0, 1).pdf(1.0) + NormalDist(2, 2).pdf(1.0)) / 2)
    got = mixture_log_likelihood(
        np.array([[0.0], [2.0]]), np.array([1.0]), np.array([[1.0], [4.0]])
    )
    assert got[0] == pytest.approx(want, abs=1e-12)


def test_referral_on_aleatoric_and_epistemic_separately() -> None:
    policy = ReferralPolicy(epistemic=1.0, aleatoric=2.0, extrapolation=False)
    r = assess(
        policy,
        epistemic=np.array([0.5, 1.5, 0.5, 1.5]),
        epistemic_name="epistemic std",
        outside=[[], [], [], []],
        aleatoric=np.array([1.0, 1.0, 3.0, 3.0]),
    )
    assert r.refer.tolist() == [False, True, True, True]
    assert r.triggers == [[], ["epistemic"], ["aleatoric"], ["epistemic", "aleatoric"]]
    assert r.reasons[2] == [
        "aleatoric std 3 (the noise expected for this input) above the threshold 2"
    ]
    assert r.reasons[1] == ["epistemic std 1.5 above the threshold 1"]


def test_save_refuses_two_outputs_without_a_variance_head(tmp_path: Path) -> None:
    args = {"out_dir": tmp_path, "name": "h", "version": "1", "task": "regression"}
    with pytest.raises(ModelError, match="also needs variance='log_variance'"):
        save(mlp(d_in=3, d_out=2), torch.randn(4, 3), intended_use="t", target="y", **args)
    with pytest.raises(ModelError, match="2 outputs for 1 target"):
        save(
            mlp(d_in=3, d_out=1),
            torch.randn(4, 3),
            intended_use="t",
            target="y",
            variance="log_variance",
            **args,
        )
    with pytest.raises(ModelError, match="not both"):
        save(
            mlp(d_in=3, d_out=2),
            torch.randn(4, 3),
            intended_use="t",
            target="y",
            variance="log_variance",
            noise_var=1.0,
            **args,
        )
    with pytest.raises(ModelError, match="not a noise parameterisation"):
        save(mlp(d_in=3, d_out=2), torch.randn(4, 3), intended_use="t", target="y",
             variance="log_var", **args)  # fmt: skip


@pytest.fixture(scope="module")
def hetero(tmp_path_factory: pytest.TempPathFactory) -> ServedModel:
    torch.manual_seed(0)
    dest = save(
        mlp(0.25, d_in=3, hidden=16, d_out=2),
        torch.randn(4, 3),
        out_dir=tmp_path_factory.mktemp("hetero"),
        name="hetero",
        version="1",
        task="regression",
        intended_use="tests only",
        target="y",
        variance="softplus_std",
    )
    return ServedModel(load_bundle(dest), device="cpu")


def test_served_summary_is_the_mixture_of_the_passes(hetero: ServedModel) -> None:
    m = hetero.manifest.aleatoric
    assert (m.kind, m.parameterisation) == ("heteroscedastic", "softplus_std")
    x = np.array([[0.5, -1.0, 2.0], [0.0, 0.0, 0.0]], dtype=np.float32)
    pred = hetero.predict(x, PredictParams(200, (0.9,), seed=4))
    req = hetero.mc_request(x, PredictParams(200, (0.9,), seed=4))
    raw = hetero.sampler.run([req])[0].astype(np.float64)  # [T, 2, 2]: mean, softplus raw
    f, s2 = raw[..., 0], np.log1p(np.exp(raw[..., 1])) ** 2
    s = pred.summary
    np.testing.assert_allclose(s.mean[:, 0], f.mean(0), rtol=1e-12)
    np.testing.assert_allclose(s.epistemic_std[:, 0], f.std(0), rtol=1e-12)
    np.testing.assert_allclose(s.aleatoric_std[:, 0], np.sqrt(s2.mean(0)), rtol=1e-12)
    np.testing.assert_allclose(s.std[:, 0], np.sqrt(f.var(0) + s2.mean(0)), rtol=1e-12)
    # Deterministic mode answers the mean head only.
    det = hetero.predict(x, PredictParams(2, (0.9,), mode="deterministic"))
    assert det.point is not None and det.point.shape == (2, 1)


def test_bundle_with_a_mismatched_head_is_refused(hetero: ServedModel, tmp_path: Path) -> None:
    # A two-output model whose manifest says one output (no noise head) does not load.
    import json
    import shutil

    dest = tmp_path / "hetero" / "1"
    shutil.copytree(hetero.bundle.path, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["aleatoric"] = {"kind": "none", "noise_var": 0.0, "parameterisation": None}
    (dest / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"outputs \[2\] per input but the manifest declares 1"):
        ServedModel(load_bundle(dest), device="cpu")
