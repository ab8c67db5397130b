"""Variational dropout at MC time (issue 20 item 2): a site shared over time draws one mask per
sequence and pass from the counter generator, the same at every step and at every padded length;
a site not declared so keeps a mask per step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from text_nets import LENGTH, MaskProbe, VariationalLSTM, token_batch
from torch import nn

from service.bundle.sequence import explicit
from service.engine import MCRequest, MCSampler
from service.errors import ModelError
from service.nn import VariationalDropout
from service.packaging.tracer import trace_with_shapes
from service.packaging.variational import declare

E = 8  # MaskProbe's features


def _sampler(module: nn.Module, x: torch.Tensor, fused: bool | None = None) -> MCSampler:
    return MCSampler(trace_with_shapes(explicit(module.eval()), x), x, device="cpu", fused=fused)


def _masks(variational: bool, x: torch.Tensor, passes: int, seed: int, **kw: bool) -> np.ndarray:
    """The probe's masks (times the scale 2) as [T, B, L, E]."""
    out = _sampler(MaskProbe(variational), x, **kw).run([MCRequest(x.numpy(), passes, seed)])[0]
    return out.reshape(passes, x.shape[0], x.shape[1], E)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "torch-masks"])
def test_a_shared_mask_is_constant_over_time_and_live(fused: bool) -> None:
    x = token_batch(4)
    m = _masks(True, x, 200, 11, fused=fused)
    assert set(np.unique(m)) == {0.0, 2.0}  # keep or drop, inverted scale 1 / (1 - 0.5)
    assert (m == m[:, :, :1]).all()  # every step uses step 0's mask
    first = m[:, :, 0]  # [T, B, E]: one mask per sequence and pass
    assert not (first == first[:1]).all()  # passes differ
    assert not (first == first[:, :1]).all()  # sequences differ
    # Keep rate within 5 binomial standard errors of the quantised 128/256 (T*B*E bytes).
    n = first.size
    assert abs((first > 0).mean() - 0.5) < 5 * np.sqrt(0.25 / n)


def test_an_undeclared_site_keeps_a_mask_per_step() -> None:
    x = token_batch(4)
    per_step = _masks(False, x, 50, 11)
    changes = (per_step != per_step[:, :, :1]).any(axis=3)  # [T, B, L]: step differs from step 0
    assert changes[:, :, 1:].mean() > 0.9  # P(8 bytes all agree) = 2**-8 per step
    # The shared mask is the same generator's: key (seed, layer), counter (pass, row, word),
    # features 0..E-1, which are exactly the bytes step 0 of the per-step mask uses.
    shared = _masks(True, x, 50, 11)
    assert np.array_equal(shared[:, :, 0], per_step[:, :, 0])


def test_without_a_declaration_the_same_model_keeps_per_step_masks() -> None:
    torch.manual_seed(0)
    sites = _sampler(VariationalLSTM(declared=False), token_batch()).graph.sites
    assert [(s.mask_shape, s.shared_over) for s in sites] == [
        ((LENGTH, 16), None),
        ((LENGTH, 20), None),
        ((20,), None),
    ]


def test_a_shared_mask_does_not_depend_on_the_padded_length() -> None:
    """A length bucket pads a text to 8, 16 or 31 tokens: its mask stays the same."""
    x = token_batch(3, seed=4)
    short = _masks(True, x[:, :8].contiguous(), 20, 5)
    full = _masks(True, x, 20, 5)
    longer = _masks(True, torch.cat([x, x[:, :15]], 1), 20, 5)
    assert np.array_equal(short[:, :, 0], full[:, :, 0])
    assert np.array_equal(full[:, :, 0], longer[:, :, 0])
    assert (longer == longer[:, :, :1]).all()


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "torch-masks"])
def test_variational_lstm_alone_shared_reordered_and_replayed(fused: bool) -> None:
    torch.manual_seed(0)
    module = declare(VariationalLSTM(), ["rnn"])
    sampler = _sampler(module, token_batch(), fused=fused)
    assert [s.shared_over for s in sampler.graph.sites] == ["time", "time", None]
    assert [s.mask_shape for s in sampler.graph.sites] == [(1, 16), (1, 20), (20,)]
    reqs = [MCRequest(token_batch(n, seed=s).numpy(), 12, 40 + s) for s, n in enumerate((1, 3, 2))]
    alone = [sampler.run([r])[0] for r in reqs]
    shared = sampler.run(reqs)
    reordered = sampler.run(list(reversed(reqs)))[::-1]
    replay = sampler.run([reqs[1]])[0]
    for a, b, c in zip(alone, shared, reordered, strict=True):
        assert a.tobytes() == b.tobytes() == c.tobytes()
    assert replay.tobytes() == alone[1].tobytes()
    assert not np.array_equal(alone[0][0], alone[0][1])  # the passes differ: masks are live


def test_fused_and_torch_masks_agree_on_shared_sites() -> None:
    torch.manual_seed(0)
    module = declare(VariationalLSTM(), ["rnn"])
    req = MCRequest(token_batch(3, seed=9).numpy(), 10, 3)
    a = _sampler(module, token_batch(), fused=True).run([req])[0]
    b = _sampler(module, token_batch(), fused=False).run([req])[0]
    assert a.tobytes() == b.tobytes()


class _OnLastState(nn.Module):
    def __init__(self, transpose: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(120, 6)
        self.drop = VariationalDropout(0.2)
        self.transpose = transpose
        self.fc = nn.Linear(6, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.emb(tokens)
        if self.transpose:  # [B, 6, L]: axis 1 is the features, not time
            return self.fc(self.drop(h.transpose(1, 2)).mean(2))
        return self.fc(self.drop(h.mean(1)))  # [B, 6]: no time axis left


@pytest.mark.parametrize(
    ("transpose", "message"),
    [(False, r"input \['B', 6\] has no time axis"), (True, "has size 6, not the input's length")],
)
def test_a_site_without_a_time_axis_is_refused(transpose: bool, message: str) -> None:
    with pytest.raises(ModelError, match=message):
        _sampler(_OnLastState(transpose), token_batch())


class _FramesFirst(nn.Module):
    """Audio features [B, mels, frames] turned frames-first for an LSTM, dropout locked over
    time on the frames and between the LSTM's layers (docs/BUNDLES.md, speech models)."""

    def __init__(self, mels: int) -> None:
        super().__init__()
        self.drop = VariationalDropout(0.1)
        self.rnn = nn.LSTM(mels, 12, num_layers=2, dropout=0.2, batch_first=True)
        self.head = nn.Linear(12, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.drop(x.transpose(1, 2)))
        return self.head(out[:, -1])


def test_a_speech_models_frames_first_tensor_shares_its_mask_over_frames() -> None:
    """Refused unless mels equalled frames: axis 1 (32 frames) was checked against the input's
    axis 1 (40 mels), a rule for token ids, whose axis 1 is time."""
    from service.packaging.variational import declare

    torch.manual_seed(0)
    module = declare(_FramesFirst(40).eval(), ["rnn"])
    sampler = _sampler(module, torch.randn(2, 40, 32))
    shapes = {s.mask_shape for s in sampler.graph.sites}
    assert shapes == {(1, 40), (1, 12)}, shapes  # one mask per clip and pass, over the frames
    x = torch.randn(3, 40, 32).numpy()
    a = sampler.run([MCRequest(x, 8, 5)])[0]
    b = sampler.run([MCRequest(x[:1], 8, 5)])[0]
    assert a[:, :1].tobytes() == b.tobytes()  # alone or with others: the same bits


class _AfterConv(nn.Module):
    """A shared site on a convolution's [B, channels, frames]: axis 1 is channels, not time."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(40, 64, 3, padding=1)
        self.drop = VariationalDropout(0.1)
        self.head = nn.Linear(64, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.conv(x)).mean(2))


def test_a_shared_site_on_a_convolutions_channels_is_refused() -> None:
    """Float inputs skipped the check: the mask was shared over the 64 channels, silently."""
    with pytest.raises(ModelError, match=r"has size 64, none of the input's sizes \[40, 32\]"):
        _sampler(_AfterConv(), torch.randn(2, 40, 32))


def test_the_module_itself_shares_its_mask_over_time_in_training() -> None:
    torch.manual_seed(3)
    drop = VariationalDropout(0.5).train()
    y = drop(torch.ones(64, LENGTH, 10))
    assert (y == y[:, :1]).all() and 0.4 < (y[:, 0] > 0).float().mean() < 0.6
    assert torch.equal(drop.eval()(y), y)
    with pytest.raises(ValueError, match=r"recurrent \(hidden-to-hidden\) dropout is not"):
        VariationalDropout(0.3, shared_over="recurrent")
