"""Variational dropout in bundles (issue 20 item 2): declared in the model or at packaging, said
in the manifest (`shared_over: "time"`), checked against the graph at load, and sampled so
(one mask per sequence and pass) at every length bucket."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from text_nets import CORPUS, PAD, GRUHead, VariationalLSTM, token_batch, wordpiece
from torch import nn

from service.api.native.routes import metadata
from service.bundle import load_bundle
from service.engine import MCRequest
from service.engine.model import ServedModel
from service.engine.params import PredictParams
from service.errors import BundleError, ModelError
from service.nn import VariationalDropout
from service.packaging import save


def _save(out: Path, module: nn.Module, name: str, **kw: object) -> Path:
    torch.manual_seed(0)
    labels = [f"c{i}" for i in range(module.fc.out_features)]  # type: ignore[union-attr,arg-type]
    return save(
        module.eval(), token_batch(), out_dir=out, name=name, version="1",
        task="classification", intended_use="tests", labels=labels,
        **kw,  # type: ignore[arg-type]
    )  # fmt: skip


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    torch.manual_seed(0)
    module = VariationalLSTM().eval()
    return module, _save(tmp_path_factory.mktemp("var"), module, "var", variational=["rnn"])


def test_the_manifest_says_which_sites_share_their_mask(bundle: tuple[nn.Module, Path]) -> None:
    raw = json.loads((bundle[1] / "manifest.json").read_text())
    assert raw["dropout"] == [
        {"name": "drop_emb", "p": 0.25, "mask_shape": [1, 16], "shared_over": "time"},
        {"name": "rnn.drops.0", "p": 0.3, "mask_shape": [1, 20], "shared_over": "time"},
        {"name": "drop", "p": 0.3, "mask_shape": [20]},  # absent: a mask per element
    ]


def test_packs_reloads_and_reproduces_the_original(bundle: tuple[nn.Module, Path]) -> None:
    module, path = bundle
    loaded = load_bundle(path)
    x = token_batch(6, seed=5)
    with torch.inference_mode():
        want, got = module(x), loaded.module(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    served = ServedModel(loaded)
    det = served.predict(
        x.numpy(), PredictParams(samples=2, confidence=(0.9,), mode="deterministic")
    )
    np.testing.assert_allclose(det.point, torch.softmax(want, 1).numpy(), rtol=0, atol=1e-5)
    # Loaded, the sampler shares the masks the manifest says, and every site is live.
    g = served.sampler.graph
    assert [s.shared_over for s in g.sites] == ["time", "time", None]
    shown = metadata(served, ["1"])["dropout"]  # GET /v1/models/{name}
    assert [d.get("shared_over") for d in shown] == ["time", "time", None]
    reqs = [MCRequest(token_batch(2, seed=s).numpy(), 16, 100 + s) for s in range(3)]
    alone = [served.sampler.run([r])[0] for r in reqs]
    for a, b in zip(alone, served.sampler.run(reqs), strict=True):
        assert a.tobytes() == b.tobytes()
    assert not np.array_equal(alone[0][0], alone[0][1])


def _edit(path: Path, site: int, **change: object) -> None:
    raw = json.loads((path / "manifest.json").read_text())
    raw["dropout"][site].update(change)
    raw["dropout"][site] = {k: v for k, v in raw["dropout"][site].items() if v is not None}
    (path / "manifest.json").write_text(json.dumps(raw))


def test_a_manifest_refuses_shared_over_on_a_site_without_a_time_axis(
    tmp_path: Path, bundle: tuple[nn.Module, Path]
) -> None:
    import shutil

    copy = tmp_path / "var" / "1"
    shutil.copytree(bundle[1], copy)
    _edit(copy, 2, shared_over="time")  # 'drop' acts on the last state, [B, 20]
    with pytest.raises(BundleError, match=r"'drop': shared_over 'time' needs a tensor with a time"):
        load_bundle(copy)
    _edit(copy, 2, shared_over=None)
    _edit(copy, 0, shared_over=None)  # the graph's VariationalDropout, not said in the manifest
    with pytest.raises(BundleError, match=r"dropout layout .* does not match the manifest"):
        ServedModel(load_bundle(copy))


class LockedDropout(nn.Module):
    """A user's own locked dropout, as AWD-LSTM code writes it: the identity in eval mode, so
    tracing alone would not even see it."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        return x * x.new_empty(x.shape[0], 1, x.shape[2]).bernoulli_(1 - self.p) / (1 - self.p)


class Pooled(nn.Module):
    """Embedding dropout shared over time, then a mean over the real tokens (so padding to any
    bucket leaves the answer alone: "auto" buckets keep it), dropout, linear. No recurrent
    layer: its ONNX export takes a second, an LSTM's ten."""

    def __init__(self, drop: nn.Module | None = None) -> None:
        super().__init__()
        self.emb = nn.Embedding(120, 12, padding_idx=PAD)
        self.drop = drop if drop is not None else VariationalDropout(0.25)
        self.head = nn.Dropout(0.2)
        self.fc = nn.Linear(12, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        keep = tokens.ne(PAD).unsqueeze(-1).float()
        x = self.drop(self.emb(tokens)) * keep
        return self.fc(self.head(x.sum(1) / keep.sum(1).clamp(min=1.0)))


def test_a_users_own_locked_dropout_is_declared_by_name(tmp_path: Path) -> None:
    path = _save(tmp_path, Pooled(LockedDropout(0.25)), "locked", variational=["drop"])
    site = load_bundle(path).manifest.dropout[0]
    assert (site.name, site.p, site.mask_shape, site.shared_over) == ("drop", 0.25, [1, 12], "time")


class _Cells(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(120, 8)
        self.cell = nn.LSTMCell(8, 8)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(8, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.emb(tokens)).mean(1))


@pytest.mark.parametrize(
    ("module", "names", "message"),
    [
        (GRUHead, ["nope"], r"no submodule 'nope'.*one of \['drop', 'gru'\]"),
        (GRUHead, ["fc"], "'fc' .Linear. is not a dropout module"),
        (GRUHead, ["gru"], "has no dropout between layers to share over time"),
        (_Cells, ["cell"], r"LSTMCell; recurrent \(hidden-to-hidden\) dropout .* not supported"),
        (GRUHead, ["drop", "drop"], "named twice"),
    ],
)
def test_a_declaration_the_engine_cannot_follow_is_refused(
    tmp_path: Path, module: type[nn.Module], names: list[str], message: str
) -> None:
    with pytest.raises(ModelError, match=message):
        _save(tmp_path, module(), "bad", variational=names)


MAX = 64


def texts(*lengths: int, seed: int = 0) -> np.ndarray:
    g = np.random.default_rng(seed)
    x = np.full((len(lengths), MAX), PAD, dtype=np.int64)
    for i, n in enumerate(lengths):
        x[i, :n] = g.integers(1, 100, n)
    return x


def test_alone_among_longer_texts_and_replayed_across_buckets(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = save(
        Pooled().eval(), torch.as_tensor(texts(MAX, 40, 9, 20)), out_dir=tmp_path,
        name="bucketed", version="1", task="classification", intended_use="tests",
        labels=["a", "b", "c"], tokenizer=wordpiece(CORPUS),
    )  # fmt: skip
    model = ServedModel(load_bundle(path), device="cpu")
    assert sorted(model.samplers) == [16, 32, 64]  # chosen by "auto"
    for sampler in model.samplers.values():  # [1, features] at every bucket length
        assert [s.mask_shape for s in sampler.graph.sites] == [(1, 12), (12,)]
    short = texts(9, seed=1)
    alone = model.sample([MCRequest(short, 12, 7)])[0]
    shared = model.sample([MCRequest(texts(64, 50, seed=3), 12, 8), MCRequest(short, 12, 7)])
    replay = model.sample([MCRequest(short, 12, 7)])[0]
    assert shared[1].tobytes() == alone.tobytes() == replay.tobytes()
    assert not np.array_equal(alone[0], alone[1])
