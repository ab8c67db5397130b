"""Operations on tensors the graph owns run in place, with the same bits (engine/inplace.py)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from nets import Residual, mlp
from text_nets import LSTMClassifier, TextCNN, TransformerClassifier, token_batch
from torch import fx, nn

from service.bundle.sequence import explicit
from service.engine import MCRequest, MCSampler, inplace, sampler, suffix
from service.engine.fused import MaskRows, apply_mask
from service.engine.masks import KeepRule, counter_base, signed_key
from service.packaging.tracer import trace_with_shapes


def _targets(gm: fx.GraphModule) -> list[str]:
    return [getattr(n.target, "__name__", str(n.target)) for n in gm.graph.nodes]


def _text_sampler(make: type[nn.Module]) -> MCSampler:
    torch.manual_seed(0)
    x = token_batch()
    return MCSampler(trace_with_shapes(explicit(make().eval()), x), x, device="cpu")


def test_the_attention_scores_are_masked_normalised_and_dropped_in_place() -> None:
    s = _text_sampler(TransformerClassifier)
    suffix = _targets(s.graph.suffix)
    # The second layer's scores: one tensor from the matmul to the dropout.
    for name in ("masked_fill_", "softmax_", "apply_keep_", "add_", "relu_"):
        assert name in suffix, name
    assert "masked_fill" not in suffix


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: _text_sampler(TransformerClassifier), None),
        (lambda: _text_sampler(LSTMClassifier), None),
        (lambda: _text_sampler(TextCNN), None),
        (lambda: mlp(0.25, d_in=30, hidden=64), (30,)),
        (lambda: Residual(), (6,)),
    ],
    ids=["transformer", "lstm", "textcnn", "mlp", "residual"],
)
def test_samples_keep_their_bits_without_the_rewrite(make, shape, monkeypatch) -> None:
    """The same sampler built with the rewrite switched off gives the same bytes."""
    built = make()
    if shape is None:
        s, xs = built, [token_batch(n, seed=k).numpy() for k, n in enumerate((1, 3, 2))]
        model, example = s.module, torch.as_tensor(xs[0])
    else:
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(1)
        xs = [torch.randn(n, *shape, generator=g).numpy() for n in (1, 3, 2)]
        model, example = built, torch.as_tensor(xs[0])
        s = MCSampler(copy.deepcopy(model), example, device="cpu")
    monkeypatch.setattr(sampler, "write_in_place", lambda gm: 0)
    plain = MCSampler(copy.deepcopy(model), example, device="cpu")
    for fused in (True, False):  # the numba kernel and the torch path
        s.fused = plain.fused = fused
        s._chunk = plain._chunk = suffix.fused if fused else suffix.eager
        reqs = [MCRequest(x, 12, 40 + k) for k, x in enumerate(xs)]
        for a, b in zip(s.run(reqs), plain.run(reqs), strict=True):
            assert a.tobytes() == b.tobytes()


def test_placeholders_and_values_read_twice_are_never_written() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.fc(x)  # read twice: never written
            y = torch.relu(h) * x  # x: a placeholder, never written; relu's result is
            return y + h  # owned and read once, and so is y

    net = Net()
    gm = fx.symbolic_trace(copy.deepcopy(net))
    assert inplace.write_in_place(gm) == 2
    names = _targets(gm)
    assert names.count("mul_") == 1 and names.count("add_") == 1 and "relu" in names
    x = torch.randn(4, 8)
    before = x.clone()
    with torch.inference_mode():
        assert torch.equal(gm(x), net(x))
    assert torch.equal(x, before)


def test_in_place_softmax_equals_the_out_of_place_one() -> None:
    g = torch.Generator().manual_seed(0)
    for shape in ((3, 4, 17, 17), (640, 256), (5, 1, 300)):
        x = torch.randn(shape, generator=g) * 8
        x[..., -3:] = float("-inf")  # padded keys, as the attention's masked scores
        expected = torch.softmax(x, -1)
        assert torch.equal(inplace.softmax_(x.clone(), -1), expected)
    # Not over the last dimension, or not contiguous: the out-of-place softmax.
    y = torch.randn(4, 6, generator=g)
    assert torch.equal(inplace.softmax_(y, 0), torch.softmax(y, 0))
    assert not torch.equal(y, torch.softmax(y, 0))  # y itself not written


def test_run_time_checks_decline_a_growing_broadcast_or_a_promotion() -> None:
    a, b = torch.ones(4, 1), torch.ones(1, 3)
    out = inplace.add_(a, b)
    assert out.shape == (4, 3) and a.shape == (4, 1) and torch.equal(a, torch.ones(4, 1))
    ints = torch.arange(4)
    assert inplace.mul_(ints, 0.5).dtype == torch.float32 and ints.tolist() == [0, 1, 2, 3]
    m = torch.zeros(2, 3)
    assert inplace.masked_fill_(m, torch.ones(4, 2, 3, dtype=torch.bool), 1.0).shape == (4, 2, 3)
    assert not m.any()


def test_the_mask_kernel_writes_into_its_input_with_the_same_numbers() -> None:
    g = torch.Generator().manual_seed(3)
    for shape, mask_shape in (((37, 13), (13,)), ((9, 5, 2, 3), (5, 1, 1))):
        x = torch.randn(shape, generator=g)
        rows = shape[0]
        keys = torch.tensor([signed_key(7, k % 3) for k in range(rows)])
        base = counter_base(torch.arange(rows) % 4, torch.arange(rows))
        mask = MaskRows(keys, base, KeepRule(0.3).threshold, mask_shape)
        expected = apply_mask(x, mask, 1 / 0.7)
        y = x.clone()
        got = apply_mask(y, mask, 1 / 0.7, inplace=True)
        assert got.data_ptr() == y.data_ptr() and torch.equal(got, expected)
        assert np.array_equal(y.numpy(), expected.numpy())
