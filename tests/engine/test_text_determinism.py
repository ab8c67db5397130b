"""Seeded text-model answers do not depend on what shares their forwards (issues 20 and 23):
attention, recurrent and convolutional layers over token ids, alone, shared and reordered.
Also run under forced CPU kernels by tests/engine/test_instruction_sets.py."""

from __future__ import annotations

import pytest
import torch
from text_nets import LSTMClassifier, TextCNN, TransformerClassifier, token_batch
from torch import nn

from service.bundle.sequence import explicit
from service.engine import MCRequest, MCSampler
from service.packaging.tracer import trace_with_shapes

MODELS = {"transformer": TransformerClassifier, "lstm": LSTMClassifier, "textcnn": TextCNN}


def _sampler(make: type[nn.Module]) -> MCSampler:
    torch.manual_seed(0)
    x = token_batch()
    return MCSampler(trace_with_shapes(explicit(make().eval()), x), x, device="cpu")


@pytest.mark.parametrize("name", list(MODELS))
def test_text_answers_alone_shared_and_reordered(name: str) -> None:
    sampler = _sampler(MODELS[name])
    reqs = [MCRequest(token_batch(n, seed=s).numpy(), 12, 40 + s) for s, n in enumerate((1, 3, 2))]
    alone = [sampler.run([r])[0] for r in reqs]
    shared = sampler.run(reqs)
    reordered = sampler.run(list(reversed(reqs)))[::-1]
    for a, b, c in zip(alone, shared, reordered, strict=True):
        assert a.tobytes() == b.tobytes() == c.tobytes()
