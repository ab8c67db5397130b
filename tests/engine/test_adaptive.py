"""Adaptive passes (issue 22, item 4): passes double until the answer's decisions are sure."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from nets import coin_net
from torch import nn

from service.bundle import load_bundle
from service.engine import adaptive
from service.engine.adaptive import Adaptive
from service.engine.model import ServedModel
from service.engine.params import PredictParams
from service.errors import InvalidInputError
from service.packaging import save


@pytest.fixture(scope="module")
def coin(tmp_path_factory: pytest.TempPathFactory) -> ServedModel:
    dest = save(
        coin_net(),
        torch.zeros(4, 1),
        out_dir=tmp_path_factory.mktemp("adaptive"),
        name="coin",
        version="1",
        task="classification",
        intended_use="tests only",
        labels=["heads", "tails"],
    )
    return ServedModel(load_bundle(dest), device="cpu")


EASY, HARD = np.array([[10.0]], np.float32), np.array([[0.0]], np.float32)
AUTO = Adaptive(max_samples=512, tolerance=0.001, first=32)


def test_easy_requests_stop_early_hard_ones_run_to_the_maximum(coin: ServedModel) -> None:
    params = [PredictParams(0, (0.9,), seed=s) for s in (1, 2, 3)]
    easy, hard, easy2 = adaptive.run(coin, [EASY, HARD, EASY], params, AUTO)
    first = coin.manifest.defaults.samples  # a classifier starts at its default passes
    assert (easy.samples, hard.samples, easy2.samples) == (first, 512, first)
    assert easy.summary.label.tolist() == [0]
    assert "adaptive passes: 512 used" in hard.warnings[-1]


def test_same_seed_same_passes_and_bytes_and_a_fixed_request_agrees(coin: ServedModel) -> None:
    x = np.concatenate([EASY, EASY])
    p = PredictParams(0, (0.9,), seed=7)
    (a,), (b,) = adaptive.run(coin, [x], [p], AUTO), adaptive.run(coin, [x], [p], AUTO)
    assert a.samples == b.samples
    assert a.summary.probabilities.tobytes() == b.summary.probabilities.tobytes()
    # Pass t's masks depend on (seed, t) only: the adaptive answer is the fixed one at its T.
    fixed = coin.predict(x, PredictParams(a.samples, (0.9,), seed=7))
    assert fixed.summary.probabilities.tobytes() == a.summary.probabilities.tobytes()
    # Alone or beside a hard request, the same answer.
    (c, _) = adaptive.run(coin, [x, HARD], [p, PredictParams(0, (0.9,), seed=8)], AUTO)
    assert c.samples == a.samples
    assert c.summary.probabilities.tobytes() == a.summary.probabilities.tobytes()


def test_regressor_passes_grow_with_a_tighter_tolerance(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 1))
    dest = save(net, torch.randn(4, 3), out_dir=tmp_path, name="r", version="1",
                task="regression", intended_use="t", target="y", noise_var=0.01)  # fmt: skip
    model = ServedModel(load_bundle(dest), device="cpu")
    x = np.random.default_rng(0).normal(size=(3, 3)).astype(np.float32)
    p = [PredictParams(0, (0.95,), seed=4)]
    used = [
        adaptive.run(model, [x], p, Adaptive(max_samples=4096, tolerance=tol))[0].samples
        for tol in (0.2, 0.05, 0.01)
    ]
    assert used[0] < used[1] < used[2] <= 4096, used


def test_bad_settings_are_refused() -> None:
    with pytest.raises(InvalidInputError, match="raise max_samples"):
        Adaptive(max_samples=16, first=32)
    with pytest.raises(InvalidInputError, match="tolerance must be a number > 0"):
        Adaptive(tolerance=0.0)


def test_predict_cli_samples_auto(coin: ServedModel) -> None:
    import json

    from typer.testing import CliRunner

    from service.cli import app

    repo = coin.bundle.path.parents[1]

    def predict(*extra: str) -> dict[str, object]:
        args = ["predict", "coin", "--instance", "[10.0]", "--seed", "5", "--model-dir", str(repo)]
        res = CliRunner().invoke(app, [*args, *extra])
        assert res.exit_code == 0, res.output
        out: dict[str, object] = json.loads(res.stdout)
        return out

    # A classifier answers quantile intervals, which at 95 % need 40 passes, and starts at its
    # default passes (100): the first chunk.
    from service.engine.summaries import min_samples_for_quantile

    d = coin.manifest.defaults
    first = max(32, min_samples_for_quantile(d.confidence), d.samples)
    auto = predict("--samples", "auto")
    assert auto["samples"] == first and f"adaptive passes: {first} used" in str(auto["warnings"])
    assert predict("--samples", "auto") == auto
    rows = auto["predictions"]
    assert isinstance(rows, list) and {r.pop("passes_used") for r in rows} == {first}
    assert predict("--samples", str(first))["predictions"] == rows
    res = CliRunner().invoke(app, ["predict", "coin", "--instance", "[1]", "--samples", "many",
                                   "--model-dir", str(repo)])  # fmt: skip
    assert res.exit_code == 2 and "give a number of passes or auto" in res.output


async def test_batcher_requeues_an_unsettled_request_behind_the_queue(coin: ServedModel) -> None:
    """Chunk by chunk through the queue: a fixed request queued beside a hard adaptive one is
    answered after the first chunk, while the hard one is queued again with twice the passes;
    the adaptive answer is the engine's (`adaptive.run`) bit for bit."""
    from concurrent.futures import ThreadPoolExecutor

    from service.engine.batcher import Batcher

    auto = Adaptive(max_samples=256, tolerance=0.001)
    with ThreadPoolExecutor(1) as pool:
        b = Batcher(coin, pool)
        b.start()
        hard = b.enqueue(HARD, PredictParams(40, (0.95,), seed=3, interval="quantile", auto=auto))
        fixed = b.enqueue(EASY, PredictParams(40, (0.95,), seed=4, interval="quantile"))
        await fixed
        assert not hard.done() and b.stats.requeued == 1
        got = await hard
        await b.stop()
    assert got.samples == 256 and got.adaptive and b.stats.requeued == 3  # 40, 80, 160, 256
    p = PredictParams(0, (0.95,), seed=3, interval="quantile")
    (ref,) = adaptive.run(coin, [HARD], [p], auto)
    assert ref.samples == 256
    assert got.summary.probabilities.tobytes() == ref.summary.probabilities.tobytes()


async def test_an_adaptive_requests_chunks_are_compute_not_queueing(
    coin: ServedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its timing counted the compute of its earlier chunks as time in the queue (18.8 of
    21.9 ms 'queued' on an idle server): the chunks are compute, summed as turns are."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    from service.engine import batcher as batcher_module
    from service.engine.batcher import Batcher

    real = batcher_module.compute.run

    def slow(*args: Any) -> Any:
        time.sleep(0.2)  # each chunk's batch: 0.2 s of compute at least
        return real(*args)

    monkeypatch.setattr(batcher_module.compute, "run", slow)
    auto = Adaptive(max_samples=160, tolerance=0.001)
    with ThreadPoolExecutor(1) as pool:
        b = Batcher(coin, pool)
        b.start()
        got = await b.enqueue(HARD, PredictParams(40, (0.95,), seed=3, auto=auto))
        await b.stop()
    assert b.stats.requeued == 2  # 40, 80, 160: three batches
    assert got.timing["compute_s"] >= 0.6, got.timing
    # Idle: it never waited behind anything. The bug put its first two chunks' compute here
    # (0.4 s at least); 0.3 leaves the event loop a share of two busy cores' time.
    assert got.timing["queue_s"] < 0.3, got.timing


def test_sets_are_settled_at_the_levels_the_answer_shows() -> None:
    """The stopping rule checked set membership at the referral policy's level (0.95) while the
    answer shows the set at the request's level: at 0.8 this blend of two digits stopped at
    T = 256 with class 6 at p = 0.9921 +- 0.0038 against the set's threshold 0.9984, a margin
    inside three standard errors (found by a reviewer's search, trial 116 of seed 0)."""
    root = Path(__file__).resolve().parents[2]
    model = ServedModel(load_bundle(root / "models" / "digits" / "2"), device="cpu")
    data = np.loadtxt(root / "models" / "data" / "digits-test.csv", delimiter=",", skiprows=1)
    x_all = data[:, :64].astype(np.float32)
    rng = np.random.default_rng(0)
    for _ in range(117):
        i, j = rng.integers(0, len(x_all), 2)
        w = rng.uniform(0.2, 0.8)
    x = np.clip(w * x_all[i] + (1 - w) * x_all[j], 0, 16).reshape(1, 1, 8, 8).astype(np.float32)
    tol = 0.002
    auto = Adaptive(max_samples=1000, tolerance=tol)
    p = PredictParams(samples=32, confidence=(0.8,), seed=7, interval="quantile", auto=auto)
    answer = adaptive.run(model, [x], [p], auto)[0]
    threshold = 1.0 - model.calibrator.q(0.8)
    probs, se = answer.summary.probabilities[0], answer.summary.probability_se[0]
    decided = (np.abs(probs - threshold) > adaptive.Z_DECIDED * se) | (se <= tol)
    assert answer.samples == 1000 or decided.all(), (answer.samples, probs, se)


def test_a_rare_flip_unseen_in_the_first_chunk_still_refers() -> None:
    """Digits test rows 190, 102 and 101 have a mutual information of about 3x the referral
    threshold at 1,000 passes, from rare flips of label: `auto` stopped at 32 passes without
    having seen one (the MI and its se both small) and missed the referral in 11-15 % of seeds
    (a reviewer's 900 runs), where 100 fixed passes miss 0-1 %. "Not referred" now waits for
    the model's default passes. Bound: 150 seeds a row, 450 runs; at the fixed rate (3 of 900,
    0.33 %) about 1.5 are expected (sd 1.2), at the old one about 54 (sd 7): at most 10."""
    root = Path(__file__).resolve().parents[2]
    model = ServedModel(load_bundle(root / "models" / "digits" / "2"), device="cpu")
    data = np.loadtxt(root / "models" / "data" / "digits-test.csv", delimiter=",", skiprows=1)
    auto = Adaptive()
    missed = 0
    for row in (190, 102, 101):
        x = data[row : row + 1, :64].astype(np.float32).reshape(1, 1, 8, 8)
        for seed in range(150):
            p = PredictParams(samples=100, confidence=(0.95,), seed=seed)
            [answer] = adaptive.run(model, [x], [p], auto)
            assert answer.referral is not None
            missed += "epistemic" not in answer.referral.triggers[0]
    assert missed <= 10, missed


def test_the_mutual_informations_standard_error_matches_its_spread() -> None:
    """The referral took the se of the expected entropy alone: 3.6 times too small when passes
    flip between confident labels (a reviewer's simulation put the referral on the wrong side
    7 % of the time against a nominal 0.13 %). Seeded: 2,000 replicates of T = 64 passes, 90 %
    confident in class 0 and 10 % in class 1; the spread of the MI estimates is known to about
    3 % (2,000 replicates), so the mean se must lie within 20 % of it."""
    from service.engine.summaries import entropy

    rng = np.random.default_rng(11)
    reps, t = 2000, 64
    flip = rng.random((reps, t)) < 0.1  # [R, T]
    confident = np.array([0.97, 0.02, 0.01])
    p_t = np.where(flip[..., None], confident[[1, 0, 2]], confident)  # [R, T, K]
    p_t = np.transpose(p_t, (1, 0, 2))  # [T, R(as B), K]
    mi = entropy(p_t.mean(0), axis=-1) - entropy(p_t, axis=-1).mean(0)
    spread = mi.std()
    se = adaptive.mi_se(p_t).mean()
    assert 0.8 < se / spread < 1.25, (se, spread)
    old = (entropy(p_t, axis=-1).std(0) / np.sqrt(t)).mean()
    assert old / spread < 0.5  # what the rule used before


def _stub_regressor(targets: list[str], qs: list[float], policy: Any, noise: float = 0.0) -> Any:
    from types import SimpleNamespace

    from service.bundle.manifest import Aleatoric

    cal = SimpleNamespace(targets=targets, policy=policy, qs=lambda level: qs, calibrated=True)
    kind = "homoscedastic" if noise else "none"
    manifest = SimpleNamespace(aleatoric=Aleatoric(kind=kind, noise_var=noise), task="regression")
    return SimpleNamespace(calibrator=cal, manifest=manifest)


def test_a_multi_target_models_epistemic_referrals_are_settled_too() -> None:
    """A multi-target model's thresholds are per target (policy.targets); the rule read only
    policy.epistemic, null there, so its referrals were never checked (a reviewer's two-target
    case stopped at 32 passes, wrongly referred 28 % of the time)."""
    from service.bundle.calibration import ReferralPolicy, TargetReferral

    rng = np.random.default_rng(3)
    raw = rng.normal(0.0, 1.0, (32, 1, 2))  # epistemic std about 1 (se 0.125) for both targets
    policy = ReferralPolicy(targets={"a": TargetReferral(), "b": TargetReferral(epistemic=1.02)})
    p = PredictParams(samples=32, confidence=(0.9,), interval="gaussian")
    # Noise of variance 8: the end points' tolerance (0.08 of a std of 3) is met at 32 passes,
    # the referral's (0.08 of its threshold) is not, and b's lies within 3 se of it.
    two = _stub_regressor(["a", "b"], [1.645] * 2, policy, noise=8.0)
    assert not adaptive._regressor(two, raw, p, 0.08).all()
    far = ReferralPolicy(targets={"b": TargetReferral(epistemic=5.0)})
    settled = _stub_regressor(["a", "b"], [1.645] * 2, far, noise=8.0)
    assert adaptive._regressor(settled, raw, p, 0.08).all()


def test_an_end_points_se_counts_how_the_mean_and_the_std_move_together() -> None:
    """The mean's and the std's errors were added as independent: with skewed passes they move
    together, and the end point mean + 1.96 std of exponential passes moved 1.34 times as far
    as the se claimed (a reviewer's 20,000 runs), so such a model stopped early. Seeded: 20,000
    runs of T = 100 (the ratio's sampling error about 0.01); the first-order se leaves some of
    a heavy tail out (1.09 here), bounded at 1.2."""
    from statistics import NormalDist

    z = NormalDist().inv_cdf(0.975)
    f = np.random.default_rng(3).exponential(1.0, (100, 20_000, 1))
    mean = f.mean(axis=0)
    dev2 = (f - mean) ** 2
    std = np.sqrt(dev2.mean(axis=0))
    claimed = float((adaptive.end_point_se(f, dev2, std, np.full(1, z)) * std).mean())
    spread = max(float((mean + z * std).std()), float((mean - z * std).std()))
    assert 0.9 < spread / claimed < 1.2, spread / claimed


def test_conformal_end_points_are_settled_with_their_own_factor() -> None:
    """A conformal end point is mean -+ q std; the rule used z, under-stating its error when q
    is over z (a reviewer's q = 4: an error 1.66 times the tolerance)."""
    from service.bundle.calibration import ReferralPolicy

    raw = np.random.default_rng(5).normal(0.0, 1.0, (64, 1, 1))
    gauss = PredictParams(samples=64, confidence=(0.95,), interval="gaussian")
    conf = PredictParams(samples=64, confidence=(0.95,), interval="conformal")
    tols = np.linspace(0.01, 2.0, 400)
    model = _stub_regressor(["y"], [4.0], ReferralPolicy())
    tol = next(t for t in tols if adaptive._regressor(model, raw, gauss, float(t)).all())
    assert not adaptive._regressor(model, raw, conf, float(tol)).all()
    like_z = _stub_regressor(["y"], [1.96], ReferralPolicy())
    assert adaptive._regressor(like_z, raw, conf, float(tol)).all()


def test_the_std_standard_error_counts_a_learned_noises_covariance() -> None:
    """The predictive variance's per-pass terms are (f_t - mean)^2 + s_t^2; the rule added their
    variances and dropped the covariance, which is large when a pass far off also predicts more
    noise (a reviewer's case: se 0.076 against a true 0.110, so requests stopped early). Seeded:
    T = 64, s_t^2 = 0.5 + z_t^2 with f_t = z_t. With the noise head's parameterisation
    log_variance, s_t^2 = exp(v_t). The tolerance that just settles it must be over the true
    se's 3 % band around 0.110 / std."""
    from service.bundle.calibration import ReferralPolicy
    from service.bundle.manifest import Aleatoric

    z = np.random.default_rng(0).standard_normal((64, 1, 1))
    raw = np.concatenate([z, np.log(0.5 + z**2)], axis=-1)  # [T, 1, mean + log-variance]
    model = _stub_regressor(["y"], [1.645], ReferralPolicy())
    model.manifest.aleatoric = Aleatoric(kind="heteroscedastic", parameterisation="log_variance")
    p = PredictParams(samples=64, confidence=(0.9,), interval="gaussian")
    std = float(np.sqrt(z.var() + (0.5 + z**2).mean()))
    spread = (z - z.mean()) ** 2 + 0.5 + z**2  # the noise's term in: their covariance counts
    u, w = (z - z.mean()) / std, (spread / std**2 - (spread / std**2).mean()) / 2
    se = max(float((u + k * w).std(ddof=1)) for k in (1.645, -1.645)) / np.sqrt(64)
    assert adaptive._regressor(model, raw, p, se * 1.001).all()
    assert not adaptive._regressor(model, raw, p, se * 0.999).all()


def test_a_nan_output_fails_at_once_not_after_max_samples(tmp_path: Path) -> None:
    """A NaN from the model never settles: `auto` ran 32, 64, ... 1000 passes (1,992) before the
    summary refused it; now the first chunk's check refuses it with the fixed request's error."""
    from service.bundle.calibration import ReferralPolicy

    raw = np.zeros((32, 2, 1))
    raw[5, 1, 0] = np.nan
    model = _stub_regressor(["y"], [1.645], ReferralPolicy())
    p = PredictParams(samples=32, confidence=(0.9,), interval="gaussian")
    with pytest.raises(InvalidInputError, match="NaN or infinite"):
        adaptive.next_passes(model, raw, p, Adaptive())
    clf = SimpleNamespace(manifest=SimpleNamespace(task="classification"))
    with pytest.raises(InvalidInputError, match="NaN or infinite"):
        adaptive.next_passes(clf, np.full((32, 1, 3), np.nan), p, Adaptive())


def test_quantile_end_points_are_settled_with_their_own_error() -> None:
    """Quantile end points were judged by the Gaussian ones' standard error, which under-states
    theirs (a reviewer's simulation: an error 2 to 4 times the tolerance). Seeded, T = 256 normal
    passes: their order-statistic se at 0.95 is 1.45 times the Gaussian end point's, and with a
    noise of variance 0.5 the mixture's own se 1.12 times (the Gaussian end's counting how its
    mean and std move together)."""
    from service.bundle.calibration import ReferralPolicy

    raw = np.random.default_rng(5).normal(0.0, 1.0, (256, 1, 1))
    gauss = PredictParams(samples=256, confidence=(0.95,), interval="gaussian")
    quant = PredictParams(samples=256, confidence=(0.95,), interval="quantile")
    tols = np.linspace(0.005, 1.0, 400)
    for noise in (0.0, 0.5):
        model = _stub_regressor(["y"], [1.96], ReferralPolicy(), noise=noise)
        tol = next(t for t in tols if adaptive._regressor(model, raw, gauss, float(t)).all())
        assert not adaptive._regressor(model, raw, quant, float(tol) * 1.08).all(), noise
        assert adaptive._regressor(model, raw, quant, 1.0).all()
