"""Trainer for MC-dropout MLPs (service.training) and the UCI benchmark script (bench.uci)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bench.uci import ROOT, repo_relative
from bench.uci import main as uci_main
from service.training import (
    mc_predict,
    mixture_log_likelihood,
    train_mlp,
)
from service.training.stack import fit, init_stack

NOISE = 0.1


def _regression(n: int, seed: int, noise: float = NOISE) -> tuple[np.ndarray, np.ndarray]:
    """A smooth, learnable target on 3 inputs of different scales, plus a constant column."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, size=(n, 3)) * np.array([1.0, 10.0, 0.1])
    y = 2.0 * x[:, 0] - 0.1 * x[:, 1] + np.sin(20 * x[:, 2]) + noise * rng.normal(size=n)
    return np.column_stack([x, np.full(n, 3.0)]), 50.0 + 10.0 * y


def _write_uci(root: Path, x: np.ndarray, y: np.ndarray, splits: int, seed: int) -> None:
    d = root / "data"
    d.mkdir(parents=True)
    rows = "\n".join(" ".join(f"{v:.6f}" for v in r) for r in np.column_stack([x, y]))
    (d / "data.txt").write_text(rows + "\n\n")  # a trailing blank line, as some UCI files have
    (d / "index_features.txt").write_text("\n".join(str(i) for i in range(x.shape[1])) + "\n")
    (d / "index_target.txt").write_text(f"{x.shape[1]}\n")
    rng = np.random.default_rng(seed)
    for i in range(splits):
        perm = rng.permutation(len(y))
        n_test = len(y) // 10
        (d / f"index_train_{i}.txt").write_text("\n".join(map(str, perm[n_test:])) + "\n")
        (d / f"index_test_{i}.txt").write_text("\n".join(map(str, perm[:n_test])) + "\n")
    for name, value in [
        ("n_splits", f"{splits}"),
        ("n_hidden", "32"),
        ("n_epochs", "10"),
        ("dropout_rates", "0.005\n0.01\n0.05"),
        # Original target units: the noise std is 10 * NOISE = 1, so tau = 1 is about right.
        ("tau_values", "0.1\n1.0\n10.0"),
    ]:
        (d / f"{name}.txt").write_text(value + "\n")


def test_bench_fast_writes_json_and_table(tmp_path: Path) -> None:
    x, y = _regression(1200, seed=0)
    _write_uci(tmp_path / "toy", x, y, splits=3, seed=1)
    out = tmp_path / "out"
    assert uci_main([str(tmp_path / "toy"), "--fast", "--out", str(out), "--epochs", "40"]) == 0

    splits = [json.loads((out / "toy" / f"split_{i}.json").read_text()) for i in range(2)]
    assert not (out / "toy" / "split_2.json").exists()  # --fast: 2 splits
    y_std = float(y.std())
    for s in splits:
        assert s["n_train"] == 1080 and s["n_test"] == 120
        # A learnable function: the MC mean must explain most of the variance (an untrained
        # network would sit near y_std = 20; the noise floor is 1).
        assert s["rmse"] < 0.25 * y_std
        # Mixture LL with sigma >= 1 / sqrt(tau) is at most -0.5 log(2 pi / tau) <= 0.23 (tau 10).
        assert -10.0 < s["test_ll"] < 0.5 * math.log(10.0 / (2 * math.pi))
        conf = s["conformal_95"]
        n = conf["n_cal"]
        assert n == 1080 - round(0.8 * 1080)
        assert conf["expected_coverage"] == pytest.approx(math.ceil((n + 1) * 0.95) / (n + 1))
        # 120 test rows: binomial sd of the coverage ~ 0.02 around ~0.95; 0.8 is > 7 sd away.
        assert 0.8 <= conf["coverage"] <= 1.0
        assert conf["mean_width"] > 0 and math.isfinite(conf["q"])
        assert 0.0 <= s["gaussian_95"]["coverage"] <= 1.0
        assert len(s["grid"]) == 2  # tiny grid: 2 dropout rates x the middle tau
        assert s["chosen"]["tau"] == 1.0
    summary = json.loads((out / "toy" / "summary.json").read_text())
    assert summary["splits"] == 2
    assert summary["rmse"][0] == pytest.approx(np.mean([s["rmse"] for s in splits]))
    table = (out / "table.md").read_text()
    assert table.startswith("| dataset |") and "| toy | 2 |" in table
    # The command names data relative to the repository, never by this machine's absolute path.
    toy = repo_relative(str(tmp_path / "toy"))
    assert summary["command"].startswith(f"python -m bench.uci {toy} --fast --out ")
    assert not any(arg.startswith("/") for arg in summary["command"].split())


def test_recorded_paths_are_relative_to_the_repository() -> None:
    shared = ROOT.parent / "shared" / "datasets" / "uci" / "yacht"
    assert repo_relative(str(shared)) == "../shared/datasets/uci/yacht"
    assert repo_relative(str(ROOT / "docs" / "uci")) == "docs/uci"
    assert repo_relative("docs/uci") == "docs/uci"  # already relative: as given
    assert repo_relative("--epochs-mult") == "--epochs-mult"


def test_bench_split_ranges_then_summarise_equal_one_run(tmp_path: Path) -> None:
    """Splits run in two processes' worth of ranges, then --summarise, match a single run."""
    x, y = _regression(400, seed=9)
    _write_uci(tmp_path / "toy", x, y, splits=3, seed=2)
    common = [str(tmp_path / "toy"), "--fast", "--epochs", "10", "--T", "50", "--cal-T", "50"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert uci_main([*common, "--splits", "3", "--out", str(whole)]) == 0
    assert uci_main([*common, "--split-from", "1", "--splits", "2", "--out", str(parts)]) == 0
    assert not (parts / "toy" / "summary.json").exists()  # a part writes split files only
    assert uci_main([*common, "--split-from", "0", "--splits", "1", "--out", str(parts)]) == 0
    assert uci_main([str(tmp_path / "toy"), "--summarise", "--out", str(parts)]) == 0

    for i in range(3):  # a split's seed is its index, whichever range ran it
        a = json.loads((whole / "toy" / f"split_{i}.json").read_text())
        b = json.loads((parts / "toy" / f"split_{i}.json").read_text())
        assert a["split"] == b["split"] == i
        # Stacks of 3 and of 1-2 splits: batched products may round differently (1e-5, as above).
        assert b["rmse"] == pytest.approx(a["rmse"], rel=1e-5)
        assert b["test_ll"] == pytest.approx(a["test_ll"], rel=1e-5)
    s_whole = json.loads((whole / "toy" / "summary.json").read_text())
    s_parts = json.loads((parts / "toy" / "summary.json").read_text())
    assert s_parts["splits"] == 3
    assert s_parts["rmse"] == pytest.approx(s_whole["rmse"], rel=1e-5)
    assert s_parts["conformal_95"] == pytest.approx(s_whole["conformal_95"], rel=1e-5)
    assert "| toy | 3 |" in (parts / "table.md").read_text()


def test_grid_picks_best_validation_ll() -> None:
    # Noise std 1 in original units: tau = 1 is right, tau = 100 and 1e-4 are far off (the
    # Gaussian LL at residual variance ~1 is about -1.4 vs -49 and -5.5 nats per row).
    x, y = _regression(600, seed=2, noise=0.1)
    r = train_mlp(x, y, seed=0, dropout_rates=(0.01,), taus=(1e-4, 1.0, 100.0), epochs=30,
                  val_passes=50)  # fmt: skip
    lls = [g.val_ll for g in r.grid]
    assert r.chosen == int(np.argmax(lls))
    assert r.grid[r.chosen].tau == 1.0 and r.tau is not None and r.tau[0] == 1.0
    assert lls[1] > max(lls[0], lls[2]) + 1.0


def test_validation_ll_matches_exported_model() -> None:
    """The stacked validation score equals the exported nn.Sequential's, within MC error."""
    x, y = _regression(700, seed=3)
    r = train_mlp(x, y, seed=1, dropout_rates=(0.05,), taus=(1.0,), epochs=20, val_passes=400)
    x_val, y_val = x[r.n_fit :], y[r.n_fit :]
    samples = r.holdout.sample(x_val, 400, seed=7)
    assert r.holdout.tau is not None
    f, yv = torch.from_numpy(samples).double(), torch.from_numpy(y_val[:, None])
    ll = mixture_log_likelihood(f, yv, torch.from_numpy(r.holdout.tau)).numpy()
    # Two independent 400-pass estimates of the same quantity (same weights, same bias from T).
    # Delta method: the MC variance of log mean_t p_t is var_t(p_t) / (T mean_t(p_t)^2) per row;
    # the difference of the two row means has variance 2 * sum_i v_i / n^2. 5 sigma.
    logp = -0.5 * r.holdout.tau[0] * (samples[..., 0] - y_val) ** 2
    dens = np.exp(logp - logp.max(0))  # var / mean^2 is scale-free; avoid underflow
    v = dens.var(0) / (len(dens) * dens.mean(0) ** 2)
    bound = 5 * math.sqrt(2 * v.sum()) / len(v)
    assert abs(float(ll.mean()) - r.grid[0].val_ll) < bound


def test_vectorised_grid_equals_config_alone() -> None:
    x, y = _regression(500, seed=4)
    kw = {"seed": 5, "epochs": 15, "val_passes": 30}
    grid = train_mlp(x, y, dropout_rates=(0.01, 0.1), taus=(0.5, 2.0), **kw)
    alone = train_mlp(x, y, dropout_rates=(0.1,), taus=(2.0,), **kw)
    # Common random numbers per split: the same init, batches and uniforms for every config,
    # so config (0.1, 2.0) follows the same trajectory in the stack as alone. Batched and single
    # matrix products may round differently; 1e-5 relative leaves room for that only.
    g = grid.grid[3]
    assert (g.dropout_rate, g.tau) == (0.1, 2.0)
    assert g.val_ll == pytest.approx(alone.grid[0].val_ll, rel=1e-5)
    assert g.val_rmse == pytest.approx(alone.grid[0].val_rmse, rel=1e-5)


def test_stacked_fit_is_independent_of_stack_mates() -> None:
    """Stack-level: a model's weights do not depend on the other configs or splits beside it."""
    rng = np.random.default_rng(6)
    xs = torch.from_numpy(rng.normal(size=(2, 300, 4)).astype(np.float32))
    ys = xs.sum(-1, keepdim=True) + 0.1 * torch.from_numpy(rng.normal(size=(2, 300, 1))).float()

    def run(splits: list[int], rates: list[float]) -> list[torch.Tensor]:
        gens = [torch.Generator().manual_seed(100 + s) for s in splits]
        split_of = torch.arange(len(splits)).repeat_interleave(len(rates))
        p = torch.tensor(rates * len(splits))
        stack = init_stack([4, 16, 1], p, split_of, gens)
        decay = torch.full((len(p),), 1e-4)
        fit(stack, xs[splits], ys[splits], decay, gens, epochs=10, batch_size=64)
        return stack.weights

    both = run([0, 1], [0.0, 0.2, 0.5])
    alone = run([1], [0.5])
    for w_both, w_alone in zip(both, alone, strict=True):
        torch.testing.assert_close(w_both[5], w_alone[0], rtol=1e-5, atol=1e-6)


def test_same_seed_same_result_and_model_layout() -> None:
    x, y = _regression(400, seed=8)
    kw = {"dropout_rates": (0.01, 0.05), "taus": (1.0,), "epochs": 10, "val_passes": 20}
    a, b = train_mlp(x, y, seed=3, **kw), train_mlp(x, y, seed=3, **kw)
    c = train_mlp(x, y, seed=4, **kw)
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert [g.val_ll for g in a.grid] == [g.val_ll for g in b.grid]
    assert not torch.equal(a.model[1].weight, c.model[1].weight)

    m = a.model
    assert isinstance(m, nn.Sequential) and isinstance(m[0], nn.Dropout)
    assert [type(layer) for layer in m] == [nn.Dropout, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert all(d.p == a.dropout_rate for d in m if isinstance(d, nn.Dropout))
    assert a.final.x_std[3] == 1.0  # the constant column
    assert a.final.y_std is not None and a.tau is not None and a.final.tau_standardised is not None
    np.testing.assert_allclose(a.final.tau_standardised, a.tau * a.final.y_std**2)
    assert set(a.timings) >= {"grid_train_s", "grid_score_s", "refit_s"}
    assert a.n_fit == 320 and a.n_val == 80 and a.final.n_rows == 400 and a.holdout.n_rows == 320


def test_mc_predict_shapes_seed_and_mean() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(5, 2)
    model = nn.Sequential(nn.Dropout(0.3), lin, nn.BatchNorm1d(2)).eval()
    model[2].running_mean.fill_(0.5)
    x = torch.randn(7, 5)
    state = torch.random.get_rng_state()
    s1 = mc_predict(model, x, 4000, seed=1, batch_rows=5000)  # 1 input row per forward
    assert torch.equal(torch.random.get_rng_state(), state)  # caller's RNG untouched
    assert s1.shape == (4000, 7, 2)
    assert not model.training and not model[0].training  # flags restored
    assert torch.equal(s1, mc_predict(model, x, 4000, seed=1, batch_rows=5000))
    s2 = mc_predict(model, x, 4000, seed=2, batch_rows=1 << 20)  # one forward
    assert not torch.equal(s1, s2) and s1.std(0).min() > 0
    # Linear after inverted dropout: the MC mean is the deterministic output; BatchNorm stays in
    # eval mode (running statistics), so that holds through it too. 5 standard errors.
    with torch.no_grad():
        det = model(x)
    for s in (s1, s2):
        se = s.std(0) / math.sqrt(s.shape[0])
        assert ((s.mean(0) - det).abs() < 5 * se).all()


def test_classification_learns_two_blobs() -> None:
    rng = np.random.default_rng(9)
    labels = rng.integers(0, 2, size=400)
    x = rng.normal(size=(400, 2)) + 3.0 * labels[:, None]
    r = train_mlp(x, labels, task="classification", seed=0, dropout_rates=(0.05, 0.2),
                  epochs=20, val_passes=20)  # fmt: skip
    assert r.tau is None and len(r.grid) == 2
    assert r.model[-1].out_features == 2
    # Bayes error with means 3 sqrt(2) apart is Phi(-2.1) = 1.7 %: 80 validation rows.
    assert all(g.val_accuracy is not None and g.val_accuracy > 0.9 for g in r.grid)
    assert all(g.val_ll > math.log(0.5) for g in r.grid)  # better than a coin
    probs = r.final.sample(x[:5], 10)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
