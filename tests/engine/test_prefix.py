"""The prefix rewritten for inference (prefix.py): same values, model untouched, batch-free."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from nets import SmallCNN, mlp, trained_bn
from torch import fx, nn

from service.api.app import build_state
from service.engine import MCRequest, MCSampler
from service.engine import prefix as prefix_module
from service.settings import Settings


def flatten_cnn() -> nn.Module:
    """The bundled digits architecture in small: convolutions, BatchNorm, max-pool, Flatten."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 32),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Linear(32, 5),
    )


def test_batchnorm_folded_and_channels_last_for_an_image_model() -> None:
    model = trained_bn(flatten_cnn(), (1, 8, 8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    sampler = MCSampler(model, x, device="cpu")
    assert sampler.prefix.rewrites == ["batchnorm folded", "channels-last"]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in sampler.prefix.module.modules())
    # Same numbers as the whole model run row by row (no prefix at all), to float rounding.
    whole = MCSampler(model, x, device="cpu", use_prefix=False)
    req = [MCRequest(x.numpy(), 40, seed=3)]
    np.testing.assert_allclose(sampler.run(req)[0], whole.run(req)[0], rtol=1e-5, atol=1e-5)
    for k, v in model.state_dict().items():  # the model's own layers are never rewritten
        assert torch.equal(v, before[k]), k


def test_channels_last_dropped_where_the_model_cannot_run_it() -> None:
    # SmallCNN calls .view() on its pooled activations, which channels-last memory refuses.
    model = trained_bn(SmallCNN(0.5), (1, 8, 8))
    x = torch.randn(3, 1, 8, 8)
    sampler = MCSampler(model, x, device="cpu")
    assert sampler.prefix.rewrites == ["batchnorm folded"]
    assert not sampler.prefix.channels_last
    assert sampler.run([MCRequest(x.numpy(), 10, seed=1)])[0].shape == (10, 3, 4)


def test_seeded_results_do_not_depend_on_the_batch_beyond_the_padding() -> None:
    # Batches over min_rows inputs run the rewritten prefix at other batch sizes than a lone
    # request (padded to 64): a seeded request's samples must still be bit-identical.
    model = trained_bn(flatten_cnn(), (1, 8, 8))
    gen = torch.Generator().manual_seed(7)
    xs = [torch.randn(n, 1, 8, 8, generator=gen).numpy() for n in (1, 70, 3, 129)]
    reqs = [MCRequest(x, 5, seed=s) for s, x in enumerate(xs)]
    sampler = MCSampler(model, torch.as_tensor(xs[0]), device="cpu")
    assert sampler.prefix.channels_last
    alone = [sampler.run([r])[0] for r in reqs]
    before = sampler.stats.prefix_forwards
    together = sampler.run(reqs)
    assert sampler.stats.prefix_forwards - before == 1
    for a, b in zip(alone, together, strict=True):
        assert np.array_equal(a, b)


def test_a_wrong_rewrite_is_dropped_even_when_the_example_is_zeros(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A fold that got the weights wrong: on all-zero inputs (what bundles give as the example)
    # a convolution returns its bias whatever its weights, so only other inputs can tell.
    real_fold = prefix_module._fold_batchnorm

    def wrong_fold(graph: fx.GraphModule) -> fx.GraphModule | None:
        folded = real_fold(graph)
        assert folded is not None
        with torch.no_grad():
            next(m for m in folded.modules() if isinstance(m, nn.Conv2d)).weight.mul_(2)
        return folded

    model = trained_bn(flatten_cnn(), (1, 8, 8))
    x = torch.randn(4, 1, 8, 8)
    whole = MCSampler(model, x, device="cpu", use_prefix=False)
    monkeypatch.setattr(prefix_module, "_fold_batchnorm", wrong_fold)
    sampler = MCSampler(model, torch.zeros(2, 1, 8, 8), device="cpu")
    assert "batchnorm folded" not in sampler.prefix.rewrites
    req = [MCRequest(x.numpy(), 20, seed=2)]
    np.testing.assert_allclose(sampler.run(req)[0], whole.run(req)[0], rtol=1e-5, atol=1e-5)


def test_the_served_model_follows_the_fused_masks_setting(repo: Path) -> None:
    for on in (True, False):
        st = build_state(Settings(model_dir=repo, fused_masks=on))
        try:
            models = [e.model for e in st.registry.load_all() if e.model is not None]
            assert models
            assert all(m.sampler.fused is on for m in models)
        finally:
            st.executor.shutdown()


def test_rewrites_only_where_they_can_pay() -> None:
    # No BatchNorm: no folded copy; no convolution or pooling: no channels-last (which only
    # added layout conversions there).
    sampler = MCSampler(mlp(0.25), torch.randn(3, 6), device="cpu")
    assert sampler.prefix.rewrites == []
    assert sampler.prefix.module is sampler.graph.prefix
    flat = nn.Sequential(
        nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 2)
    )
    assert MCSampler(flat, torch.randn(3, 1, 8, 8), device="cpu").prefix.rewrites == []
    no_bn = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Dropout(0.2), nn.Linear(256, 2)
    )
    assert MCSampler(no_bn, torch.randn(3, 1, 8, 8), device="cpu").prefix.rewrites == [
        "channels-last"
    ]


def test_a_prefix_without_batch_sized_algorithms_is_padded_to_two_inputs() -> None:
    """A transformer's prefix (embeddings, per-input linear blocks, attention products batched
    per input and head) is padded to 2 inputs, not 64; convolutional and recurrent prefixes keep
    the full pad; seeded samples keep their bits alone, shared and reordered either way."""
    from text_nets import LSTMClassifier, TextCNN, TransformerClassifier, token_batch

    from service.bundle.sequence import explicit
    from service.engine.sampler import MIN_PREFIX_ROWS
    from service.packaging.tracer import trace_with_shapes

    def head_only(make: type[nn.Module]) -> MCSampler:
        torch.manual_seed(0)
        x = token_batch()
        return MCSampler(trace_with_shapes(explicit(make().eval()), x), x, device="cpu")

    expected = {TransformerClassifier: MIN_PREFIX_ROWS, LSTMClassifier: 64, TextCNN: 64}
    for make, rows in expected.items():
        sampler = head_only(make)
        for sites in (None, 1):  # every site, and the head's only (the encoder in the prefix)
            plan = sampler.plan(sites)
            assert sampler.prefix_rows(plan) == rows, (make.__name__, sites)
            seen: list[int] = []
            real = plan.prefix.module.forward

            def counted(x: torch.Tensor, real: Any = real, seen: list[int] = seen) -> Any:
                seen.append(x.shape[0])
                return real(x)

            plan.prefix.module.forward = counted  # type: ignore[method-assign]
            reqs = [
                MCRequest(token_batch(n, seed=s).numpy(), 8, 40 + s, sites=sites)
                for s, n in enumerate((1, 3))
            ]
            alone = [sampler.run([r])[0] for r in reqs]
            shared = sampler.run(reqs)
            reordered = sampler.run(reqs[::-1])[::-1]
            plan.prefix.module.forward = real  # type: ignore[method-assign]
            assert seen == [rows, max(rows, 3), max(rows, 4), max(rows, 4)]
            for a, b, c in zip(alone, shared, reordered, strict=True):
                assert a.tobytes() == b.tobytes() == c.tobytes()

    # A matrix product that folds the batch into its rows keeps the pad.
    class Folded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 4))
            self.drop = nn.Dropout(0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.drop(torch.matmul(x, self.w))

    folded = MCSampler(Folded(), torch.zeros(2, 3, 4), device="cpu")
    assert folded.prefix.batch_sensitive and folded.prefix_rows(folded.plan(None)) == 64
