"""Which dropout sites are sampled (issue 20, item 3): all, or the last k in graph order, the
earlier ones folded into the deterministic prefix."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nets import mlp
from torch import nn

from service.engine import MCRequest, MCSampler
from service.engine.graph import apply_keep
from service.engine.inplace import apply_keep_
from service.engine.masks import KeepRule, keep_bytes, keep_factors
from service.engine.plans import MAX_PLANS
from service.errors import InvalidInputError


def _weights(graph: torch.fx.GraphModule) -> list[str]:
    """The weights a graph reads (its linear layers, each rewritten as a blocked product)."""
    return [n.target for n in graph.graph.nodes if n.op == "get_attr" and "weight" in n.target]


def _keeps(graph: torch.fx.GraphModule) -> int:
    # apply_keep_: the same, written into its input (engine/inplace.py)
    kinds = (apply_keep, apply_keep_)
    return sum(1 for n in graph.graph.nodes if n.op == "call_function" and n.target in kinds)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "torch-masks"])
def test_last_one_equals_the_first_dropout_off_and_the_second_sampled(fused: bool) -> None:
    """By hand: the trunk in eval mode (first dropout the identity), then the second site's
    masks from the counter generator under its own index (1), then the last layer."""
    torch.manual_seed(0)
    model = mlp(0.25, d_in=6, hidden=16, d_out=3).eval()
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    sampler = MCSampler(model, x, device="cpu", fused=fused)
    passes, seed = 30, 1234
    got = sampler.run([MCRequest(x.numpy(), passes, seed, sites=1)])[0]
    with torch.inference_mode():
        h = torch.relu(model[3](torch.relu(model[0](x))))  # dropout 0 is off
        rule = KeepRule(0.25)
        keep = keep_factors(
            keep_bytes(seed, 1, 5, 0, passes * 5, 16, torch.device("cpu")), rule.threshold
        )
        rows = h.repeat(passes, 1) * keep * rule.scale  # row t * B + i
        want = model[6](rows).view(passes, 5, 3).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # Not the same as sampling both sites, nor as no site at all.
    every = sampler.run([MCRequest(x.numpy(), passes, seed)])[0]
    assert not np.allclose(got, every)
    assert got.std(0).min() > 0


def test_the_prefix_absorbs_the_earlier_sites() -> None:
    model = mlp(0.25, d_in=6, hidden=16, d_out=3)
    x = torch.randn(4, 6)
    sampler = MCSampler(model, x, device="cpu")
    every, last = sampler.plan(None), sampler.plan(1)
    assert [s.name for s in every.graph.sites] == ["2", "5"]
    assert [s.name for s in last.graph.sites] == ["5"] and last.graph.first_site == 1
    assert _keeps(every.graph.suffix) == 2 and _keeps(last.graph.suffix) == 1
    # Both hidden layers now run once per input; only the output layer runs per pass.
    assert _weights(every.graph.prefix) == ["0.weight"]
    assert _weights(every.graph.suffix) == ["3.weight", "6.weight"]
    assert _weights(last.graph.prefix) == ["0.weight", "3.weight"]
    assert _weights(last.graph.suffix) == ["6.weight"]
    assert not any(n.op == "call_module" and n.target == "2" for n in last.graph.prefix.graph.nodes)
    # The prefix runs once per batch (per setting), whatever T.
    before = sampler.stats.prefix_forwards
    sampler.run([MCRequest(x.numpy(), 50, 1, sites=1)])
    assert sampler.stats.prefix_forwards - before == 1


def test_seeded_bits_per_setting_alone_and_mixed() -> None:
    """Same seed and setting: same bytes, whatever shares the batch (other settings too)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.2),
        nn.Linear(16, 16), nn.ReLU(), nn.Dropout(0.3),
        nn.Linear(16, 16), nn.ReLU(), nn.Dropout(0.1),
        nn.Linear(16, 2),
    )  # fmt: skip
    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(n, 6, generator=gen).numpy() for n in (2, 3, 1, 2)]
    sampler = MCSampler(model, torch.as_tensor(xs[0]), device="cpu")
    reqs = [
        MCRequest(xs[0], 20, 5, sites=1),
        MCRequest(xs[1], 10, 6, sites=None),
        MCRequest(xs[2], 30, 7, sites=2),
        MCRequest(xs[3], 20, 5, sites=1),
    ]
    alone = [sampler.run([r])[0] for r in reqs]
    before = sampler.stats.prefix_forwards
    mixed = sampler.run(reqs)
    assert sampler.stats.prefix_forwards - before == 3  # one shared forward per setting
    again = sampler.run(list(reversed(reqs)))[::-1]
    for a, b, c in zip(alone, mixed, again, strict=True):
        assert a.tobytes() == b.tobytes() == c.tobytes()
    # k = 3 is every site: the same graph and the same bits as "all".
    full = sampler.run([MCRequest(xs[1], 10, 6, sites=3)])[0]
    assert full.tobytes() == alone[1].tobytes()
    # The settings differ from each other (for one input and seed).
    outs = [sampler.run([MCRequest(xs[0], 20, 5, sites=k)])[0] for k in (1, 2, 3)]
    assert not np.array_equal(outs[0], outs[1]) and not np.array_equal(outs[1], outs[2])


def test_splits_are_built_lazily_and_bounded() -> None:
    layers: list[nn.Module] = []
    for _ in range(MAX_PLANS + 2):
        layers += [nn.Linear(8, 8), nn.ReLU(), nn.Dropout(0.2)]
    model = nn.Sequential(*layers, nn.Linear(8, 2))
    x = torch.randn(2, 8)
    sampler = MCSampler(model, x, device="cpu")
    assert sampler.sites == MAX_PLANS + 2 and not sampler.plans.cached
    for k in range(1, MAX_PLANS + 2):
        sampler.run([MCRequest(x.numpy(), 4, 0, sites=k)])
    cached = sampler.plans.cached
    assert len(cached) == MAX_PLANS and 1 not in cached  # the oldest went
    sampler.pin(1)  # a model's default stays, whatever requests ask for
    for k in range(2, MAX_PLANS + 2):
        sampler.run([MCRequest(x.numpy(), 4, 0, sites=k)])
    assert sampler.plan(1) is sampler.plans.pinned[1]
    with pytest.raises(InvalidInputError, match=r"1 <= k <= 6 \(the model has 6\), got 7"):
        sampler.run([MCRequest(x.numpy(), 4, 0, sites=MAX_PLANS + 3)])
    with pytest.raises(InvalidInputError, match="got 0"):
        sampler.run([MCRequest(x.numpy(), 4, 0, sites=0)])
