"""Speech models over audio features (log-mel frames computed by the client): a float
[mels, frames] input into a convolution and a stacked GRU packs, reloads, and is served with
every dropout site sampled, the GRU's hidden dropout included (docs/BUNDLES.md "Speech")."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from service.bundle import load_bundle
from service.engine import MCRequest
from service.engine.model import ServedModel
from service.engine.params import PredictParams
from service.packaging import save

MELS, FRAMES = 40, 32
SITES = ["drop_in", "rnn.drops.0", "drop"]  # in graph order; the GRU's own made explicit


class KeywordSpotter(nn.Module):
    """A small keyword spotter: 1-D convolution over time, a 2-layer bidirectional GRU with
    dropout between its layers, dropout before the classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.drop_in = nn.Dropout(0.1)
        self.conv = nn.Conv1d(MELS, 16, 5, padding=2)
        self.rnn = nn.GRU(16, 12, num_layers=2, dropout=0.3, batch_first=True, bidirectional=True)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(24, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, mels, frames]
        h = torch.relu(self.conv(self.drop_in(x))).transpose(1, 2)
        _, state = self.rnn(h)
        return self.fc(self.drop(torch.cat([state[-2], state[-1]], dim=1)))


def _frames(n: int, seed: int) -> torch.Tensor:
    """Log-mel-like values: mostly negative, a few dB of spread."""
    return torch.randn(n, MELS, FRAMES, generator=torch.Generator().manual_seed(seed)) * 3 - 8


@pytest.fixture(scope="module")
def spotter(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    torch.manual_seed(0)
    module = KeywordSpotter().eval()
    path = save(
        module, _frames(4, 0), out_dir=tmp_path_factory.mktemp("speech"), name="keywords",
        version="1", task="classification", intended_use="tests",
        labels=["yes", "no", "up", "down"],
    )  # fmt: skip
    return module, path


def test_packs_reloads_and_answers_like_the_original(spotter: tuple[nn.Module, Path]) -> None:
    module, path = spotter
    loaded = load_bundle(path)
    assert loaded.manifest.inputs.dtype == "float32"
    assert loaded.manifest.inputs.shape == [MELS, FRAMES]
    assert [d.name for d in loaded.manifest.dropout] == SITES
    x = _frames(5, 7)
    with torch.inference_mode():
        want = module(x)
        torch.testing.assert_close(loaded.module(x), want, rtol=1e-5, atol=1e-5)
    det = ServedModel(loaded).predict(
        x.numpy(), PredictParams(samples=2, confidence=(0.9,), mode="deterministic")
    )
    assert det.backend == "onnxruntime" and det.point is not None
    np.testing.assert_allclose(det.point, torch.softmax(want, 1).numpy(), rtol=0, atol=1e-5)


def test_every_site_sampled_and_seeded_answers_do_not_depend_on_the_batch(
    spotter: tuple[nn.Module, Path],
) -> None:
    served = ServedModel(load_bundle(spotter[1]), fused_masks=False)
    g = served.sampler.graph
    assert [s.name for s in g.sites] == SITES
    x = _frames(3, 2)
    with torch.inference_mode():
        frontier = served.sampler.prefix(x)
        ones = [torch.ones((3, *s.mask_shape)) for s in g.sites]
        base = g.suffix(*frontier, *ones)
        gen = torch.Generator().manual_seed(1)
        for i, site in enumerate(g.sites):  # each site's mask alone changes the answer
            keeps = list(ones)
            keeps[i] = (torch.rand((3, *site.mask_shape), generator=gen) > 0.5).float()
            assert not torch.equal(g.suffix(*frontier, *keeps), base), site.name
    reqs = [MCRequest(_frames(2, 10 + s).numpy(), 20, 100 + s) for s in range(3)]
    alone = [served.sampler.run([r])[0] for r in reqs]
    shared = served.sampler.run(reqs)
    for a, b in zip(alone, shared, strict=True):
        assert a.tobytes() == b.tobytes()
    assert not np.array_equal(alone[0][0], alone[0][1])  # the passes differ: masks are live
