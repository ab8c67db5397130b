"""What `save` refuses because the bundle would compute another function than the module, or
fail every MC request: dropout sites not batched in dimension 0, randomness only train mode has,
in-place aliasing, outputs that are not one tensor; and what it must leave alone (the module's
train/eval modes, a deterministic train/eval difference, a renamed nn.Dropout)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from nets import mlp
from torch import nn

from service.bundle import load_bundle
from service.engine import MCRequest
from service.engine.model import ServedModel
from service.errors import ModelError
from service.packaging import save, writer
from service.packaging.cli import example_input

X = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))


def _save(module: nn.Module, example: torch.Tensor, out: Path, **kw: object) -> Path:
    with torch.no_grad():
        n = copy.deepcopy(module).eval()(example).shape[-1] if "labels" not in kw else 0
    kw.setdefault("labels", [f"c{i}" for i in range(n)])
    return save(
        module, example, out_dir=out, name="m", version="1", task="classification",
        intended_use="tests", **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def _refused(module: nn.Module, example: torch.Tensor, out: Path, **kw: object) -> str:
    with pytest.raises(ModelError) as e:
        _save(module, example, out, **kw)
    assert not (out / "m").exists()
    return e.value.message


def _mc(path: Path, x: torch.Tensor) -> np.ndarray:
    served = ServedModel(load_bundle(path))  # fused masks, as the server runs them
    return served.sampler.run([MCRequest(x.numpy(), 8, 1)])[0]


# 1. Dropout sites whose input is not batched in dimension 0.


class SeqFirst(nn.Module):  # PyTorch's PositionalEncoding tutorial: dropout on [L, B, D]
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.drop, self.fc = nn.Linear(5, 16), nn.Dropout(0.1), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.inp(x).transpose(0, 1)).mean(0))


class PosTable(nn.Module):  # a learned position table [L, D], dropped before the batch joins
    def __init__(self) -> None:
        super().__init__()
        self.pos, self.drop = nn.Parameter(torch.randn(7, 5)), nn.Dropout(0.2)
        self.fc = nn.Linear(35, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc((x + self.drop(self.pos)).flatten(1))


class DropConnect(nn.Module):  # dropout on a weight
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.drop, self.o = nn.Linear(5, 8), nn.Dropout(0.3), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(F.linear(x, self.drop(self.fc.weight), self.fc.bias)).mean(1)


@pytest.mark.parametrize(
    ("model", "shape"),
    [(SeqFirst, [7, 2, 16]), (PosTable, [7, 5]), (DropConnect, [8, 5])],
)
def test_a_dropout_site_not_batched_in_dimension_0_is_refused(
    tmp_path: Path, model: type[nn.Module], shape: list[int]
) -> None:
    """The reviewer's: saved, then every MC request failed with a broadcast RuntimeError."""
    torch.manual_seed(0)
    message = _refused(model(), torch.randn(4, 7, 5), tmp_path)
    assert message.startswith(
        f"dropout site 'drop' (Dropout) is on a tensor whose first dimension is not the batch "
        f"(shape {shape} for a batch of 2"
    )
    assert "apply it to a batch-first tensor" in message


def test_save_runs_one_mc_pass_before_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: object, requests: object) -> object:
        raise RuntimeError("Attempting to broadcast a dimension of length 2")

    monkeypatch.setattr(writer.MCSampler, "run", broken)
    message = _refused(mlp(0.25), X, tmp_path)
    assert message.startswith(
        "the bundle's MC passes fail on the example (RuntimeError: Attempting to broadcast a "
        "dimension of length 2), so every MC request would fail"
    )


# 2. Dropout that only train mode has.


class LockedDropout(nn.Module):  # AWD-LSTM's, with a float p
    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not self.p:
            return x
        keep = x.new_empty(x.size(0), 1, x.size(2)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Awd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.lock = nn.Embedding(20, 8), LockedDropout(0.4)
        self.rnn, self.d, self.o = nn.GRU(8, 8, batch_first=True), nn.Dropout(0.2), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(self.d(self.rnn(self.lock(self.emb(x)))[0][:, -1]))


class DropPath(nn.Module):  # timm's stochastic depth
    def __init__(self, p: float) -> None:
        super().__init__()
        self.drop_prob = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1 - self.drop_prob
        return x * x.new_empty((x.shape[0], 1)).bernoulli_(keep) / keep


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.i, self.fc, self.dp = nn.Linear(6, 8), nn.Linear(8, 8), DropPath(0.3)
        self.d, self.o = nn.Dropout(0.1), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.i(x)
        return self.o(self.d(h + self.dp(F.relu(self.fc(h)))))


class IfTraining(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.d, self.o = nn.Linear(6, 8), nn.Dropout(0.1), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.a(x))
        if self.training:
            h = F.dropout(h, 0.5)
        return self.o(self.d(h))


IDS = torch.randint(0, 20, (3, 7), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    ("model", "example", "where"),
    [
        (Awd, IDS, "in layer 'lock' (LockedDropout)"),
        (Residual, X, "in layer 'dp' (DropPath)"),
        (IfTraining, X, "in the model's forward()"),
    ],
)
def test_dropout_only_train_mode_has_is_refused(
    tmp_path: Path, model: type[nn.Module], example: torch.Tensor, where: str
) -> None:
    """The reviewer's: saved, and the bundle's MC passes never sampled it."""
    torch.manual_seed(0)
    module = model().train()
    message = _refused(module, example, tmp_path, buckets=None)
    assert message.startswith(
        f"the model draws random numbers in train mode that are not an nn.Dropout module ({where})"
    )
    assert "variational= (docs/BUNDLES.md)" in message
    assert all(m.training for m in module.modules())  # its modes as they were


class Augmented(nn.Module):
    """Noise for training only (augmentation): not to be sampled at inference."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp(0.25)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x + 0.1 * torch.randn_like(x) if self.training else x)


class Counting(nn.Module):
    """A train branch that keeps state (a call counter): no randomness, not refused."""

    def __init__(self) -> None:
        super().__init__()
        self.net, self.calls = mlp(0.25), 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            return self.net(x) + self.calls
        return self.net(x)


def test_training_noise_is_refused_unless_allowed_and_state_is_no_noise(tmp_path: Path) -> None:
    torch.manual_seed(0)
    message = _refused(Augmented(), X, tmp_path)
    assert message.endswith("if it is noise meant for training only (augmentation), pass "
                            "train_noise='allow'")  # fmt: skip
    assert _save(Augmented(), X, tmp_path / "a", train_noise="allow").is_dir()
    assert _save(Counting(), X, tmp_path / "c").is_dir()  # was refused as randomness


def test_a_declared_locked_dropout_packages(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = _save(Awd(), IDS, tmp_path, buckets=None, variational="lock")
    assert [d.name for d in load_bundle(path).manifest.dropout] == ["lock", "d"]


class TrainShift(nn.Module):
    """A deterministic train/eval difference (no randomness): not refused."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp(0.25)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) + (1.0 if self.training else 0.0)


def test_a_deterministic_train_eval_difference_packages(tmp_path: Path) -> None:
    torch.manual_seed(0)
    assert _save(TrainShift(), X, tmp_path).is_dir()


# 3. In-place aliasing, and the CLI's example.


class Alias(nn.Module):
    def __init__(self, functional: bool = False) -> None:
        super().__init__()
        self.functional = functional
        self.a, self.act = nn.Linear(6, 8), nn.ReLU(inplace=True)
        self.d, self.o = nn.Dropout(0.3), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        r = F.relu(h, inplace=True) if self.functional else self.act(h)
        return self.o(self.d(h + r))


@pytest.mark.parametrize(
    ("functional", "start"),
    [
        (False, "layer 'act' (ReLU) modifies its input 'a' in place, and ['add'] read it too"),
        (True, "relu(inplace=True) at node 'relu' modifies its input 'a' in place"),
    ],
)
def test_an_inplace_layer_whose_input_is_read_again_is_refused(
    tmp_path: Path, functional: bool, start: str
) -> None:
    """The reviewer's: with zeros as the example (the CLI's) the bundle computed h + h."""
    torch.manual_seed(0)
    message = _refused(Alias(functional), torch.zeros(2, 6), tmp_path)
    assert message.startswith(start)
    assert "set inplace=False" in message


def test_an_inplace_layer_alone_on_its_input_packages(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(inplace=True), nn.Dropout(0.2), nn.Linear(8, 2))
    assert _save(model, X, tmp_path).is_dir()


class ReadFirst(nn.Module):
    """The input's other reader runs before the in-place layer: it saw h as it was, as the
    bundle computes it, so nothing differs."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.act = nn.Linear(6, 8), nn.ReLU(inplace=True)
        self.d, self.o = nn.Dropout(0.3), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        total = h.sum(dim=1, keepdim=True)
        return self.o(self.d(self.act(h))) + total


def test_an_inplace_layer_read_before_packages(tmp_path: Path) -> None:
    torch.manual_seed(0)
    assert _save(ReadFirst(), X, tmp_path).is_dir()


class ShapeRead(nn.Module):
    """The in-place layer's input is read again for its shape only: the same either way."""

    def __init__(self) -> None:
        super().__init__()
        self.c, self.act = nn.Conv1d(1, 4, 3, padding=1), nn.ReLU(inplace=True)
        self.d, self.o = nn.Dropout(0.2), nn.Linear(24, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c(x.unsqueeze(1))
        out = self.act(h)
        return self.o(self.d(out.reshape(h.shape[0], -1)))


def test_an_inplace_layer_whose_input_is_read_for_its_shape_packages(tmp_path: Path) -> None:
    torch.manual_seed(0)
    assert _save(ShapeRead(), X, tmp_path).is_dir()


class RenamedDropout(nn.Dropout):
    pass


class DropThenReuse(nn.Module):
    def __init__(self, drop: nn.Module) -> None:
        super().__init__()
        self.a, self.d, self.o = nn.Linear(6, 8), drop, nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        return self.o(torch.cat([self.d(h), h], dim=1))


@pytest.mark.parametrize("cls", [nn.Dropout, RenamedDropout])
def test_an_inplace_dropout_whose_input_is_reused_is_refused(tmp_path: Path, cls: type) -> None:
    """A renamed subclass was swapped for nn.Dropout(p) without its inplace, and saved."""
    torch.manual_seed(0)
    message = _refused(DropThenReuse(cls(0.2, inplace=True)), X, tmp_path)
    assert message.startswith("layer 'd' (Dropout) modifies its input 'relu' in place")


def test_the_cli_example_is_random_and_within_the_training_ranges() -> None:
    x = example_input([3], None)
    assert x.shape == (4, 3) and bool((x != 0).all())
    assert torch.equal(x, example_input([3], None))  # seeded
    ranged = example_input([1, 2], [(10.0, 11.0), (-3.0, -2.0)])
    assert ranged.shape == (4, 1, 2)
    assert bool((ranged[..., 0] >= 10).all() and (ranged[..., 0] <= 11).all())
    assert bool((ranged[..., 1] >= -3).all() and (ranged[..., 1] <= -2).all())


# 4. Outputs that are not one tensor.


class Pair(nn.Module):
    def __init__(self, as_dict: bool) -> None:
        super().__init__()
        self.as_dict = as_dict
        self.a, self.d, self.m, self.v = (
            nn.Linear(6, 8),
            nn.Dropout(0.3),
            nn.Linear(8, 1),
            nn.Linear(8, 1),
        )

    def forward(self, x: torch.Tensor) -> object:
        h = self.d(F.relu(self.a(x)))
        return (
            {"out": torch.cat([self.m(h), self.v(h)], 1)}
            if self.as_dict
            else (self.m(h), self.v(h))
        )


@pytest.mark.parametrize(("as_dict", "kind"), [(False, "tuple"), (True, "dict")])
def test_an_output_that_is_not_one_tensor_is_refused(
    tmp_path: Path, as_dict: bool, kind: str
) -> None:
    message = _refused(Pair(as_dict), X, tmp_path, labels=["a", "b"])
    assert message == (
        f"the model returns a {kind}, not a tensor: return one tensor [B, outputs]; for a noise "
        "head, torch.cat([mean, v], -1)"
    )


# 7. BatchNorm with a cumulative average.


def test_batch_norm_with_momentum_none_packages_and_loads(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 8), nn.BatchNorm1d(8, momentum=None), nn.ReLU(), nn.Dropout(0.3),
        nn.Linear(8, 2),
    )  # fmt: skip
    model.train()(torch.randn(32, 6))  # running statistics
    path = _save(model, X, tmp_path)
    with torch.no_grad():
        want = model.eval()(X)
    assert torch.allclose(load_bundle(path).module(X), want, atol=1e-6)


# 8. Messages, nn.Dropout subclasses and the module's modes.


def test_an_unreproducible_forward_names_its_largest_difference(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rebuild = writer.rebuild

    class Off(nn.Module):  # the rebuilt graph, off by 0.5 at output 1
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x) + torch.tensor([0.0, 0.5])

    monkeypatch.setattr(writer, "rebuild", lambda *a, **k: Off(rebuild(*a, **k)))
    torch.manual_seed(0)
    message = _refused(mlp(0.25), X, tmp_path)
    assert message.startswith(
        "the module's forward cannot be reproduced from its traced graph: output 1 of example row"
    )
    assert "(largest difference 0.5)" in message


class Renamed(nn.Dropout):
    pass


class MCDropout(nn.Dropout):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.p, training=True)


def test_a_subclass_of_dropout_keeping_its_forward_is_a_site(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), Renamed(0.2), nn.Linear(8, 2))
    path = _save(model, X, tmp_path)
    assert [(d.name, d.p) for d in load_bundle(path).manifest.dropout] == [("2", 0.2)]
    assert np.isfinite(_mc(path, X)).all()


def test_a_subclass_of_dropout_overriding_forward_is_named(tmp_path: Path) -> None:
    model = nn.Sequential(
        nn.Linear(6, 8), nn.ReLU(), nn.Sequential(MCDropout(0.2)), nn.Linear(8, 2)
    )
    message = _refused(model, X, tmp_path, labels=["a", "b"])
    assert message == (
        "dropout in layer '2.0' (MCDropout): MCDropout subclasses nn.Dropout but overrides "
        "forward(), which a bundle cannot reproduce; keep nn.Dropout's forward (or use nn.Dropout)"
    )


def test_save_leaves_the_modules_modes_as_they_were(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = mlp(0.25).train()
    model[0].eval()  # mixed modes come back as they were too
    modes = [m.training for m in model.modules()]
    save(
        model, X, out_dir=tmp_path, name="m", version="1", task="classification",
        labels=["a", "b"], intended_use="tests",
    )  # fmt: skip
    assert [m.training for m in model.modules()] == modes
    with pytest.raises(ModelError):  # and after a refusal
        save(
            model, X, out_dir=tmp_path, name="m", version="2", task="classification",
            labels=["a"], intended_use="tests",
        )  # fmt: skip
    assert [m.training for m in model.modules()] == modes


def test_the_cli_example_keeps_to_open_ranges() -> None:
    """Without training ranges the valid ranges bound it (the CLI passes them): a model taking
    sqrt of a non-negative feature was handed negatives."""
    inf = float("inf")
    x = example_input([3], [(0.0, inf), (-inf, 5.0), (-inf, inf)])
    assert bool((x[:, 0] >= 0).all() and (x[:, 1] <= 5).all() and x.isfinite().all())


class Root(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = mlp(0.25)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(torch.sqrt(x))


def test_nan_where_the_module_has_nan_is_reproduced(tmp_path: Path) -> None:
    """sqrt of a negative example value: NaN from the module and from the graph alike was
    refused as "nan from the module but nan from the graph"."""
    torch.manual_seed(0)
    assert _save(Root(), X, tmp_path).is_dir()


class _Probabilities(nn.Module):
    """A classifier that ends in a softmax, by module, function or method."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 3))
        self.soft = nn.Softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.body(x)
        if self.how == "module":
            return self.soft(z)
        if self.how == "function":
            return F.softmax(z, dim=-1)
        if self.how == "method":
            return z.softmax(-1)
        return z.exp() / z.exp().sum(-1, keepdim=True)  # by hand: only the numbers tell


@pytest.mark.parametrize("how", ["module", "function", "method", "by hand"])
def test_a_classifier_that_returns_probabilities_is_refused(tmp_path: Path, how: str) -> None:
    """Served as softmax(softmax(z)): a confident [1, 0, 0] became [0.58, 0.21, 0.21]."""
    torch.manual_seed(0)
    with pytest.raises(ModelError, match="return the logits: the server applies the softmax"):
        save(_Probabilities(how).eval(), torch.randn(4, 4), out_dir=tmp_path, name="p",
             version="1", task="classification", intended_use="t",
             labels=["a", "b", "c"])  # fmt: skip
    # log_softmax is harmless (softmax of it is softmax of the logits): packaged.
    log = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.Linear(8, 3), nn.LogSoftmax(-1))
    save(log.eval(), torch.randn(4, 4), out_dir=tmp_path, name="log", version="1",
         task="classification", intended_use="t", labels=["a", "b", "c"])  # fmt: skip


def test_a_one_logit_binary_classifier_is_told_how_to_package(tmp_path: Path) -> None:
    """It was told "labels must name each of the 1 output logits", with one label or two."""
    one = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.Linear(8, 1))
    for labels in (["lesion"], ["no lesion", "lesion"]):
        with pytest.raises(ModelError, match=r"at least 2, not 1; .*torch.cat\(\[torch.zeros_like"):
            save(one.eval(), torch.randn(4, 4), out_dir=tmp_path, name="b", version="1",
                 task="classification", intended_use="t", labels=labels)  # fmt: skip
    with pytest.raises(ModelError, match=r"name each of the 3 output logits \(got 2\)"):
        save(mlp(0.2, d_in=4, hidden=8, d_out=3).eval(), torch.randn(4, 4), out_dir=tmp_path,
             name="c", version="1", task="classification", intended_use="t",
             labels=["a", "b"])  # fmt: skip


def test_integer_pixels_are_told_to_come_as_floats(tmp_path: Path) -> None:
    """uint8 pixels were read as token ids and failed with "Input type (long int)"."""
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Dropout2d(0.2), nn.Flatten(), nn.Linear(144, 2))
    pixels = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    with pytest.raises(ModelError, match=r"integer example_input \(torch.uint8\) is read as token"):
        save(cnn.eval(), pixels, out_dir=tmp_path, name="u", version="1", task="classification",
             intended_use="t", labels=["a", "b"])  # fmt: skip
    save(cnn.eval(), pixels.float() / 255, out_dir=tmp_path, name="u", version="1",
         task="classification", intended_use="t", labels=["a", "b"],
         value_range=(0.0, 1.0))  # fmt: skip


class _NonNegativeDouble(nn.Module):
    """Logits that are all non-negative (a ReLU last), returned as float64."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.Linear(8, 3), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).to(torch.float64)


def test_non_negative_float64_logits_package(tmp_path: Path) -> None:
    """The probabilities check compared a float64 sum with float32 ones: a RuntimeError."""
    torch.manual_seed(0)
    save(_NonNegativeDouble().eval(), torch.randn(4, 4), out_dir=tmp_path, name="d",
         version="1", task="classification", intended_use="t",
         labels=["a", "b", "c"])  # fmt: skip


def test_a_text_model_without_an_embedding_is_told_so(tmp_path: Path) -> None:
    """It was told to send pixels as floats."""
    from text_nets import CORPUS, token_batch, wordpiece

    bag = nn.Sequential(nn.Linear(16, 8), nn.Dropout(0.2), nn.Linear(8, 2))
    said = r"a text model.s token ids must be read by an nn\.Embedding"
    with pytest.raises(ModelError, match=said):
        save(bag.eval(), token_batch(), out_dir=tmp_path, name="t", version="1",
             task="classification", intended_use="t", labels=["a", "b"],
             tokenizer=wordpiece(CORPUS))  # fmt: skip
