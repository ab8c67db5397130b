"""The vectorised MC sampler against a plain loop, the prefix split, chunking and seeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nets import (
    FOUR_MODEL_IDS,
    FOUR_MODELS,
    FunctionalDropout,
    Residual,
    SmallCNN,
    mlp,
    trained_bn,
)
from torch import nn

from service.engine import MCRequest, MCSampler
from service.errors import InvalidInputError, ModelError

Z = 4.5  # two-sided p of about 7e-6 per comparison: with fixed seeds, a failure means a bug


def plain_loop(model: nn.Module, x: torch.Tensor, passes: int, seed: int) -> np.ndarray:
    """The textbook MC dropout: eval(), dropout modules train(), T separate forwards."""
    model.eval()
    for m in model.modules():
        if isinstance(m, nn.Dropout | nn.Dropout2d):
            m.train()
    torch.manual_seed(seed)
    with torch.inference_mode():
        out = torch.stack([model(x) for _ in range(passes)])
    model.eval()
    return out.numpy().astype(np.float64)


def z_scores(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """z of the difference of means and of variances, with standard errors from the samples."""
    t_a, t_b = a.shape[0], b.shape[0]
    va, vb = a.var(0), b.var(0)
    z_mean = (a.mean(0) - b.mean(0)) / np.sqrt(va / t_a + vb / t_b)
    # Var of a sample variance is (mu4 - sigma^4) / T, estimated from the samples themselves.
    m4a = ((a - a.mean(0)) ** 4).mean(0)
    m4b = ((b - b.mean(0)) ** 4).mean(0)
    z_var = (va - vb) / np.sqrt((m4a - va**2) / t_a + (m4b - vb**2) / t_b)
    return z_mean, z_var


@pytest.mark.parametrize("make, shape", FOUR_MODELS, ids=FOUR_MODEL_IDS)
def test_vectorised_agrees_with_plain_loop(make, shape) -> None:
    torch.manual_seed(0)
    model = make()
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(1))
    passes = 3000
    loop = plain_loop(model, x, passes, seed=11)
    engine = MCSampler(model, x, device="cpu").run([MCRequest(x.numpy(), passes, seed=12)])[0]
    assert engine.shape == loop.shape
    z_mean, z_var = z_scores(engine.astype(np.float64), loop)
    assert np.all(np.abs(z_mean) < Z), z_mean
    assert np.all(np.abs(z_var) < Z), z_var
    assert loop.std(0).min() > 0  # the comparison is not between two constants


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: mlp(0.25), (6,)),
        (lambda: trained_bn(SmallCNN(0.5), (1, 8, 8)), (1, 8, 8)),
        (lambda: Residual(), (6,)),
    ],
    ids=["mlp", "cnn-bn", "residual"],
)
def test_prefix_split_equals_unsplit(make, shape) -> None:
    torch.manual_seed(0)
    model = make()
    x = torch.randn(5, *shape, generator=torch.Generator().manual_seed(2))
    split = MCSampler(model, x, device="cpu")
    whole = MCSampler(model, x, device="cpu", use_prefix=False)
    assert len(split.graph.frontier_batched) >= 1
    req = [MCRequest(x.numpy(), 50, seed=7)]
    a, b = split.run(req)[0], whole.run(req)[0]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_prefix_is_really_deterministic_part() -> None:
    model = trained_bn(SmallCNN(0.5), (1, 8, 8))
    sampler = MCSampler(model, torch.randn(2, 1, 8, 8), device="cpu")
    prefix_code = sampler.graph.prefix.code
    suffix_code = sampler.graph.suffix.code
    # The convolutions run once per input; only the head runs once per pass.
    assert "conv" in prefix_code and "bn" in prefix_code
    assert "conv" not in suffix_code and "head" in suffix_code
    res = MCSampler(Residual(), torch.randn(2, 6), device="cpu")
    # The residual branch z and the side branch's input both cross into the suffix.
    assert len(res.graph.frontier_batched) >= 2


def test_batchnorm_statistics_unchanged() -> None:
    model = trained_bn(SmallCNN(0.5), (1, 8, 8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 1, 8, 8)
    MCSampler(model, x, device="cpu").run([MCRequest(x.numpy(), 200, seed=1)])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not model.bn.training


def test_chunking_does_not_change_results() -> None:
    model = mlp(0.25)
    x = torch.randn(7, 6)
    reqs = [MCRequest(x.numpy(), 40, seed=3), MCRequest(x[:2].numpy(), 90, seed=4)]
    big = MCSampler(model, x, device="cpu", row_budget=100_000)
    small = MCSampler(model, x, device="cpu", row_budget=64)
    a, b = big.run(reqs), small.run(reqs)
    assert small.stats.forwards > big.stats.forwards == 1
    for u, v in zip(a, b, strict=True):
        assert np.array_equal(u, v)


def test_seeded_requests_share_forward_and_match_alone() -> None:
    torch.manual_seed(0)
    model = trained_bn(SmallCNN(0.5), (1, 8, 8))
    gen = torch.Generator().manual_seed(5)
    xs = [torch.randn(n, 1, 8, 8, generator=gen).numpy() for n in (1, 3, 2, 5)]
    reqs = [
        MCRequest(x, t, seed=s)
        for x, t, s in zip(xs, (30, 10, 64, 7), (1, 2, 3, 2**63 - 1), strict=True)
    ]
    sampler = MCSampler(model, torch.as_tensor(xs[0]), device="cpu")
    alone = [sampler.run([r])[0] for r in reqs]
    before = sampler.stats.forwards
    together = sampler.run(reqs)
    assert sampler.stats.forwards - before == 1  # one shared stochastic forward
    for a, b in zip(alone, together, strict=True):
        assert np.array_equal(a, b)


def test_unseeded_rows_differ_between_seeds_and_passes() -> None:
    model = mlp(0.25)
    x = torch.randn(1, 6).repeat(2, 1)
    sampler = MCSampler(model, x, device="cpu")
    a, b = sampler.run([MCRequest(x.numpy(), 20, seed=1), MCRequest(x.numpy(), 20, seed=2)])
    assert not np.array_equal(a, b)
    assert not np.array_equal(a[0], a[1])  # passes differ
    assert not np.array_equal(a[:, 0], a[:, 1])  # two copies of one input get their own masks


def test_deterministic_path_is_eval_output() -> None:
    model = trained_bn(SmallCNN(0.5), (1, 8, 8))
    x = torch.randn(3, 1, 8, 8)
    sampler = MCSampler(model, x, device="cpu")
    with torch.inference_mode():
        expected = model.eval()(x).numpy()
    np.testing.assert_allclose(sampler.deterministic(x.numpy()), expected, rtol=1e-6, atol=1e-6)


def test_refusals() -> None:
    with pytest.raises(ModelError, match="no dropout layer with p > 0"):
        MCSampler(nn.Sequential(nn.Linear(3, 2)), torch.randn(2, 3))
    with pytest.raises(ModelError, match="functional dropout at node"):
        MCSampler(FunctionalDropout(), torch.randn(2, 6))
    with pytest.raises(ModelError, match="AlphaDropout"):
        MCSampler(nn.Sequential(nn.Linear(3, 3), nn.AlphaDropout(0.2)), torch.randn(2, 3))
    sampler = MCSampler(mlp(), torch.randn(2, 6))
    with pytest.raises(InvalidInputError, match=r"shape \[6\], got \[5\]"):
        sampler.run([MCRequest(np.zeros((1, 5), np.float32), 10, 1)])
