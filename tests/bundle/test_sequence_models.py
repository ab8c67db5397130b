"""Text and sequence models in bundles (issue 20, items 1-2): token inputs, embeddings,
recurrent and attention layers, every dropout site sampled, shape-only branches traced."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hostile import edit_json, repin
from text_nets import (
    CORPUS,
    LENGTH,
    PAD,
    VOCAB,
    GRUHead,
    LSTMClassifier,
    SinusoidalAttention,
    TextCNN,
    TransformerClassifier,
    token_batch,
    wordpiece,
)
from torch import fx, nn

from service.bundle import load_bundle
from service.bundle.architecture import describe
from service.engine import MCRequest
from service.engine.inputs import to_array
from service.engine.model import ServedModel
from service.engine.params import PredictParams
from service.errors import BundleError, InvalidInputError, ModelError
from service.packaging import save

MODELS = {
    "textcnn": TextCNN,
    "lstm": LSTMClassifier,
    "gru-stacked": lambda: LSTMClassifier("GRU"),
    "transformer": TransformerClassifier,
    "transformer-norm-first-seq-first": lambda: TransformerClassifier(True, False),
    "attention-sinusoidal": SinusoidalAttention,
    "gru-head": GRUHead,
}
# Dropout sites torch runs in training, per model: the engine must sample every one of them.
SITES = {
    "textcnn": ["drop"],
    "lstm": ["rnn.drops.0", "drop"],
    "gru-stacked": ["rnn.drops.0", "drop"],
    "transformer": [
        f"enc.layers.{i}.{s}"
        for i in range(2)
        for s in ("self_attn.dropout", "dropout1", "dropout", "dropout2")
    ]
    + ["drop"],
    "attention-sinusoidal": ["attn.dropout"],
    "gru-head": ["drop"],
}
SITES["transformer-norm-first-seq-first"] = SITES["transformer"]


def _labels(module: nn.Module) -> list[str]:
    return [f"c{i}" for i in range(module.fc.out_features)]  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[nn.Module, Path]]:
    root = tmp_path_factory.mktemp("text")
    out = {}
    for name, make in MODELS.items():
        torch.manual_seed(0)
        module = make().eval()
        path = save(
            module, token_batch(), out_dir=root, name=name, version="1",
            task="classification", intended_use="tests", labels=_labels(module),
        )  # fmt: skip
        out[name] = (module, path)
    return out


@pytest.mark.parametrize("name", list(MODELS))
def test_packs_reloads_and_reproduces_the_original(
    bundles: dict[str, tuple[nn.Module, Path]], name: str
) -> None:
    module, path = bundles[name]
    loaded = load_bundle(path)
    assert loaded.manifest.inputs.dtype == "int64"
    assert loaded.manifest.inputs.shape == [LENGTH]
    assert loaded.manifest.inputs.value_range == (0.0, float(VOCAB - 1))
    x = token_batch(6, seed=5)
    with torch.inference_mode():
        want, got = module(x), loaded.module(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # The deterministic path (onnxruntime) takes the same token ids.
    det = ServedModel(loaded).predict(
        x.numpy(), PredictParams(samples=2, confidence=(0.9,), mode="deterministic")
    )
    assert det.backend == "onnxruntime"
    np.testing.assert_allclose(det.point, torch.softmax(want, 1).numpy(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_every_dropout_site_is_sampled(
    bundles: dict[str, tuple[nn.Module, Path]], name: str
) -> None:
    """Each site's mask, alone, changes the output: none is left deterministic."""
    served = ServedModel(load_bundle(bundles[name][1]), fused_masks=False)
    g = served.sampler.graph
    assert [s.name for s in g.sites] == SITES[name]
    assert [d.name for d in served.manifest.dropout] == SITES[name]
    x = torch.as_tensor(token_batch(3, seed=2))
    with torch.inference_mode():
        frontier = served.sampler.prefix(x)
        ones = [torch.ones((3, *s.mask_shape)) for s in g.sites]
        base = g.suffix(*frontier, *ones)
        gen = torch.Generator().manual_seed(1)
        for i, site in enumerate(g.sites):
            keeps = list(ones)
            keeps[i] = (torch.rand((3, *site.mask_shape), generator=gen) > 0.5).float()
            assert not torch.equal(g.suffix(*frontier, *keeps), base), site.name


@pytest.mark.parametrize("name", ["transformer", "lstm"])
def test_seeded_answers_alone_shared_and_replayed(
    bundles: dict[str, tuple[nn.Module, Path]], name: str
) -> None:
    served = ServedModel(load_bundle(bundles[name][1]), fused_masks=False)
    reqs = [MCRequest(token_batch(2, seed=s).numpy(), 20, 100 + s) for s in range(3)]
    alone = [served.sampler.run([r])[0] for r in reqs]
    shared = served.sampler.run(reqs)
    again = served.sampler.run(list(reversed(reqs)))[::-1]
    for a, b, c in zip(alone, shared, again, strict=True):
        assert a.tobytes() == b.tobytes() == c.tobytes()
    assert not np.array_equal(alone[0][0], alone[0][1])  # the passes differ: masks are live


def test_stacked_rnn_with_hidden_dropout_is_never_described_as_is() -> None:
    """Packaged through `save` it is made explicit; a graph still holding the fused layer is
    refused rather than served without its between-layer dropout."""
    gm = fx.symbolic_trace(LSTMClassifier().eval())
    with pytest.raises(ModelError, match="a stacked LSTM with hidden dropout"):
        describe(gm)


class _ShapeBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:  # flat pixels from a CSV: common in user code
            x = x.view(-1, 1, 8, 8)
        x = torch.relu(self.conv(x))
        return self.fc(self.drop(x.view(x.size(0), -1)))


class _ValueBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.drop = nn.Dropout(0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            x = -x
        return self.fc(self.drop(x))


def test_a_branch_on_shapes_packages(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = _ShapeBranch().eval()
    path = save(
        module, torch.randn(4, 64), out_dir=tmp_path, name="flat", version="1",
        task="classification", intended_use="t", labels=["a", "b", "c"],
    )  # fmt: skip
    x = torch.randn(7, 64)  # another batch size than the example's: the batch stays free
    with torch.inference_mode():
        torch.testing.assert_close(load_bundle(path).module(x), module(x))


class _PoolsOverPadding(nn.Module):
    """nn.TransformerEncoder at its defaults (nested tensors on) pooled over every position."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 32, padding_idx=PAD)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(32, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.enc(self.emb(tokens), src_key_padding_mask=tokens.eq(PAD))
        return self.fc(self.drop(x.mean(1)))


def test_torchs_inference_fast_path_is_not_taken_for_the_models_function(tmp_path: Path) -> None:
    """In inference torch's encoder makes nested tensors of a padded batch and writes zeros at
    the padding, a path training (and every MC pass) never takes: an ordinary encoder pooled
    over all positions was refused as if its forward read Python state."""
    torch.manual_seed(0)
    module = _PoolsOverPadding().eval()
    x = token_batch()
    with torch.inference_mode():
        fast = module(x)
    trained = module(x).detach()  # grad on: the path training takes
    assert not torch.allclose(fast[0], trained[0], atol=1e-3)  # they differ on the padded row
    path = save(
        module, x, out_dir=tmp_path, name="pooled", version="1", task="classification",
        intended_use="t", labels=["a", "b"],
    )  # fmt: skip
    with torch.inference_mode():
        torch.testing.assert_close(load_bundle(path).module(x), trained, rtol=1e-5, atol=1e-5)
    assert torch.backends.mha.get_fastpath_enabled()  # torch's setting is left as it was


def _refusal(module: nn.Module, x: torch.Tensor, out: Path, **kw: Any) -> str:
    """Why `save` refuses `module` (a two-label classifier of example `x`)."""
    with pytest.raises(ModelError) as e:
        save(module.eval(), x, out_dir=out, name="m", version="1", task="classification",
             intended_use="t", labels=["a", "b"], **kw)  # fmt: skip
    return e.value.message


class _Packed(nn.Module):
    """A GRU over packed sequences, the lengths moved to the CPU as torch asks, or not."""

    def __init__(self, cpu: bool) -> None:
        super().__init__()
        self.cpu_lengths = cpu
        self.emb = nn.Embedding(VOCAB, 16, padding_idx=PAD)
        self.rnn = nn.GRU(16, 16, batch_first=True, bidirectional=True)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(32, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        lengths = tokens.ne(PAD).sum(1).clamp(min=1)
        if self.cpu_lengths:
            lengths = lengths.cpu()
        packed = nn.utils.rnn.pack_padded_sequence(
            self.drop(self.emb(tokens)), lengths, batch_first=True, enforce_sorted=False
        )
        _, h = self.rnn(packed)
        return self.fc(self.drop(torch.cat([h[0], h[1]], -1)))


@pytest.mark.parametrize("cpu", [True, False])
def test_packed_sequences_are_refused_with_what_to_do(tmp_path: Path, cpu: bool) -> None:
    """Refused as a meta tensor that cannot be copied (with .cpu()) or as a branch on values
    with torch.where as the fix (without): neither said what was wrong."""
    said = _refusal(_Packed(cpu), token_batch(), tmp_path, tokenizer=wordpiece(CORPUS))
    assert said.startswith("packed sequences (torch.nn.utils.rnn.pack_padded_sequence")
    assert "pool with the padding mask" in said


class _PadSequenceBug(nn.Module):
    """A shape error inside pad_sequence (no packing anywhere)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.drop, self.out = nn.Linear(4, 8), nn.Dropout(0.2), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        y = nn.utils.rnn.pad_sequence([h, h[:, :3]], batch_first=True)  # trailing 8 against 3
        return self.out(self.drop(y.sum(0)))


def test_a_shape_error_in_pad_sequence_keeps_its_own_message(tmp_path: Path) -> None:
    said = _refusal(_PadSequenceBug(), torch.randn(4, 4), tmp_path)
    assert "packed sequences" not in said and "fails on an input of the declared shape" in said


class _Causal(nn.Module):
    """An encoder with a causal mask made in forward from the length, and a padding mask."""

    def __init__(self, from_arange: bool) -> None:
        super().__init__()
        self.from_arange = from_arange
        self.emb = nn.Embedding(VOCAB, 32, padding_idx=PAD)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.fc = nn.Linear(32, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pad = tokens.eq(PAD)
        if self.from_arange:  # as the refusal says
            pos = torch.arange(tokens.size(1), device=tokens.device)
            causal = pos[None, :] > pos[:, None]
        else:
            causal = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1])
        h = self.enc(self.emb(tokens), mask=causal, src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).float()
        return self.fc((h * keep).sum(1) / keep.sum(1))


def test_a_tensor_made_from_the_length_is_refused_naming_it_and_the_fix_packages(
    tmp_path: Path,
) -> None:
    """The refusal said 'function <built-in method full of type object at 0x7f..>'."""
    torch.manual_seed(0)
    tok = wordpiece(CORPUS)
    kw: dict[str, Any] = dict(task="classification", intended_use="t", labels=["a", "b"])
    x = token_batch(length=64)  # room for length buckets (16, 32, 64): the length is free
    with pytest.raises(ModelError) as e:
        save(_Causal(False).eval(), x, out_dir=tmp_path, name="c", version="1",
             tokenizer=tok, **kw)  # fmt: skip
    assert "function torch.full at node" in e.value.message and " at 0x" not in e.value.message
    assert "pos = torch.arange(x.size(1), device=x.device)" in e.value.message
    path = save(_Causal(True).eval(), x, out_dir=tmp_path, name="c", version="1",
                tokenizer=tok, **kw)  # fmt: skip
    assert json.loads((path / "manifest.json").read_text())["inputs"]["text"]["buckets"]


def test_saving_a_stacked_rnn_prints_no_warning_from_torchs_internals(tmp_path: Path) -> None:
    import warnings

    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        save(
            LSTMClassifier("GRU").eval(), token_batch(), out_dir=tmp_path, name="g", version="1",
            task="classification", intended_use="t", labels=["a", "b", "c"],
        )  # fmt: skip
    assert not [w for w in seen if "_flat_weights" in str(w.message)]


def test_a_branch_on_values_is_refused_with_the_fix(tmp_path: Path) -> None:
    said = _refusal(_ValueBranch(), torch.randn(4, 4), tmp_path)
    assert "branches on tensor values or on the batch size" in said and "torch.where" in said


def test_token_ids_are_checked(bundles: dict[str, tuple[nn.Module, Path]]) -> None:
    spec = load_bundle(bundles["textcnn"][1]).manifest.inputs
    ok = to_array([[1] * LENGTH, [PAD] * LENGTH], spec, 8)
    assert ok.dtype == np.int64
    with pytest.raises(InvalidInputError) as e:
        to_array([[1] * (LENGTH - 1) + [VOCAB]], spec, 8)
    assert e.value.message == (
        f"instance 0, element {LENGTH - 1} = {VOCAB} is outside the valid range "
        f"[0, {VOCAB - 1}]; check the value and its unit"
    )
    with pytest.raises(InvalidInputError, match="token ids are whole numbers"):
        to_array([[1.5] * LENGTH], spec, 8)


@pytest.fixture(scope="module")
def text_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    tok = wordpiece(CORPUS)
    assert tok.get_vocab_size() <= VOCAB
    return save(
        TextCNN().eval(), token_batch(), out_dir=tmp_path_factory.mktemp("tok"), name="notes",
        version="1", task="classification", intended_use="tests", labels=["a", "b", "c"],
        tokenizer=tok, truncation="error",
    )  # fmt: skip


def test_a_tokenizer_travels_in_the_bundle(text_bundle: Path) -> None:
    from service.engine.text import encode_texts

    loaded = load_bundle(text_bundle)
    spec = loaded.manifest.inputs.text
    assert spec is not None and spec.max_tokens == LENGTH and spec.pad_id == 0
    assert loaded.manifest.artifacts["tokenizer.json"].role == "tokenizer"
    batch = encode_texts(["Chest pain", {"text": "stroke"}], loaded.tokenizer, spec, 8)
    assert batch.ids.shape == (2, LENGTH) and batch.ids.dtype == np.int64
    want = [loaded.tokenizer.encode(t).ids for t in ("Chest pain", "stroke")]
    assert batch.tokens == [len(w) for w in want] and batch.truncated == [False, False]
    for row, w in zip(batch.ids, want, strict=True):
        assert row[: len(w)].tolist() == w and (row[len(w) :] == PAD).all()
    served = ServedModel(loaded)
    a = served.predict(batch.ids, PredictParams(samples=10, confidence=(0.9,), seed=4))
    b = served.predict(batch.ids[:1], PredictParams(samples=10, confidence=(0.9,), seed=4))
    assert a.summary.probabilities[0].tobytes() == b.summary.probabilities[0].tobytes()


@pytest.mark.parametrize(
    ("instance", "message"),
    [
        ("", "instance 0: the text is empty (or only whitespace)"),
        ("  \n\t ", "instance 0: the text is empty (or only whitespace)"),
        ("chest\x00pain", "instance 0: the text contains a NUL character"),
        (
            "\u200b\ufeff\u0301",
            "instance 0: the text has no token this model reads (its tokenizer drops every "
            "character: zero-width, combining or control characters); send words",
        ),
        ("\ud800 pain", "instance 0: the text is not valid Unicode (a lone surrogate)"),
        (12, "instance 0: expected a string of text, got int"),
        ({"txt": "pain"}, 'instance 0: a text instance is a string or {"text": "..."}'),
    ],
    ids=["empty", "whitespace", "nul", "no-token", "surrogate", "number", "bad-key"],
)
def test_bad_texts_say_what_to_fix(text_bundle: Path, instance: Any, message: str) -> None:
    from service.engine.text import encode_texts

    loaded = load_bundle(text_bundle)
    assert loaded.manifest.inputs.text is not None
    with pytest.raises(InvalidInputError) as e:
        encode_texts([instance], loaded.tokenizer, loaded.manifest.inputs.text, 8)
    assert e.value.message == message


def test_too_many_tokens_with_policy_error(text_bundle: Path) -> None:
    from service.engine.text import encode_texts

    loaded = load_bundle(text_bundle)
    assert loaded.manifest.inputs.text is not None
    text = " ".join(["pain"] * (LENGTH + 3))
    n = len(loaded.tokenizer.encode(text).ids)
    with pytest.raises(InvalidInputError) as e:
        encode_texts([text], loaded.tokenizer, loaded.manifest.inputs.text, 8)
    assert e.value.message == (
        f"instance 0: {n} tokens, over this model's maximum of {LENGTH} (truncation policy "
        "'error'): shorten the text"
    )


def test_a_text_over_the_byte_limit_is_refused_before_tokenizing(text_bundle: Path) -> None:
    from service.engine.text import encode_texts
    from service.errors import PayloadTooLargeError

    spec = load_bundle(text_bundle).manifest.inputs.text
    assert spec is not None

    class Exploding:
        def encode_batch(self, *_: Any, **__: Any) -> Any:
            raise AssertionError("tokenized a text over the byte limit")

    with pytest.raises(PayloadTooLargeError, match="over this model's limit of 100000"):
        encode_texts(["a" * 100_001], Exploding(), spec, 8)


def test_truncation_is_reported(text_bundle: Path) -> None:
    from service.engine.text import encode_texts

    loaded = load_bundle(text_bundle)
    assert loaded.manifest.inputs.text is not None
    spec = loaded.manifest.inputs.text.model_copy(update={"truncation": "truncate"})
    text = " ".join(["pain"] * (LENGTH + 3))
    batch = encode_texts([text], loaded.tokenizer, spec, 8)
    assert batch.tokens == [len(loaded.tokenizer.encode(text).ids)] and batch.truncated == [True]
    assert (batch.ids != PAD).all()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda d: d.__setitem__(
                "pre_tokenizer",
                {
                    "type": "Split",
                    "pattern": {"Regex": "(a+)+$"},
                    "behavior": "Isolated",
                    "invert": False,
                },
            ),
            "pre_tokenizer Split uses a custom regular expression",
        ),
        (
            lambda d: d.__setitem__(
                "normalizer", {"type": "Precompiled", "precompiled_charsmap": ""}
            ),
            "normalizer type 'Precompiled' is not allowed",
        ),
        (
            lambda d: d.__setitem__(
                "normalizer",
                {
                    "type": "Sequence",
                    "normalizers": [
                        {"type": "Replace", "pattern": {"Regex": "(x|x)*y"}, "content": ""}
                    ],
                },
            ),
            "normalizer Replace uses a custom regular expression",
        ),
        (  # the reviewer's: 22 of these turned 100 bytes into a 1.6 GB allocation (abort)
            lambda d: d.__setitem__(
                "normalizer",
                {
                    "type": "Sequence",
                    "normalizers": [
                        {"type": "Replace", "pattern": {"String": "a"}, "content": "aa"}
                    ]
                    * 3,
                },
            ),
            "its normalizers can make a text more than 4 times longer",
        ),
        (
            lambda d: d.__setitem__(
                "normalizer", {"type": "Replace", "pattern": {"String": "a"}, "content": "b" * 65}
            ),
            "normalizer Replace inserts 65 characters, over 64",
        ),
        (
            lambda d: d.__setitem__(
                "normalizer", {"type": "Sequence", "normalizers": [{"type": "Lowercase"}] * 17}
            ),
            "normalizer Sequence must list at most 16 components",
        ),
        (
            lambda d: d.__setitem__(
                "post_processor",
                {
                    "type": "TemplateProcessing",
                    "single": [{"Sequence": {"id": "A", "type_id": 0}}] * 17,
                    "pair": [],
                    "special_tokens": {},
                },
            ),
            "post_processor template 'single' must have at most 16 entries",
        ),
        (
            lambda d: d.__setitem__(
                "post_processor",
                {
                    "type": "TemplateProcessing",
                    "single": [{"SpecialToken": {"id": "[X]", "type_id": 0}}],
                    "pair": [],
                    "special_tokens": {"[X]": {"id": "[X]", "ids": [0] * 17, "tokens": ["x"] * 17}},
                },
            ),
            "post_processor special token '[X]' must stand for at most 16 ids",
        ),
        (
            lambda d: d["model"].__setitem__("max_input_chars_per_word", 10**9),
            "model max_input_chars_per_word 1000000000 is outside 1..200",
        ),
        (
            lambda d: d["model"].__setitem__("dropout", 0.1),
            "model dropout 0.1 tokenizes at random",
        ),
        (  # U+FDFA is 18 characters in NFKD: six rounds made 664,030 characters of 10
            lambda d: d.__setitem__(
                "normalizer",
                {
                    "type": "Sequence",
                    "normalizers": [
                        {"type": "Replace", "pattern": {"String": "a"}, "content": "\ufdfa"},
                        {"type": "NFKD"},
                    ],
                },
            ),
            "its normalizers can make a text more than 4 times longer",
        ),
        (  # decoders run too (the word check decodes ids): 3 of these took 3.5 s a row
            lambda d: d.__setitem__(
                "decoder",
                {
                    "type": "Sequence",
                    "decoders": [
                        {"type": "Replace", "pattern": {"String": "a"}, "content": "a" * 64}
                    ],
                },
            ),
            "its decoders can make a text more than 4 times longer",
        ),
        (  # Prepend runs once per piece between added tokens: "a[SEP]" repeated grew 65 x
            lambda d: d.__setitem__("normalizer", {"type": "Prepend", "prepend": "_" * 8}),
            "its normalizers can make a text more than 4 times longer",
        ),
        (  # 16 per Sequence, 4 deep, was 65,536 steps: each costs a pass over the text
            lambda d: d.__setitem__(
                "normalizer",
                {
                    "type": "Sequence",
                    "normalizers": [
                        {"type": "Sequence", "normalizers": [{"type": "Lowercase"}] * 9}
                    ]
                    * 2,
                },
            ),
            "normalizer has more than 16 components in all",
        ),
        (  # the library panicked on the first text: start-up stopped (reviewer BL)
            lambda d: d.__setitem__(
                "post_processor",
                {
                    "type": "TemplateProcessing",
                    "single": [
                        {"SpecialToken": {"id": "[X]", "type_id": 0}},
                        {"Sequence": {"id": "A", "type_id": 0}},
                    ],
                    "pair": [],
                    "special_tokens": {},
                },
            ),
            "post_processor template names special token '[X]', which its special_tokens do "
            "not declare",
        ),
        (  # it slices tokens by both counts: overlapping, a short token panicked the process
            lambda d: d.__setitem__(
                "decoder", {"type": "Strip", "content": "a", "start": 1, "stop": 1}
            ),
            "decoder Strip with stop 1 can panic on a short token; only stop 0 is accepted",
        ),
        (  # WordLevel without its unknown token: every unknown word failed at serve time
            lambda d: d.__setitem__(
                "model", {"type": "WordLevel", "vocab": {"[PAD]": 0, "a": 1}, "unk_token": "[UNK]"}
            ),
            "the tokenizer fails on a probe (Exception: WordLevel error: Missing [UNK] token",
        ),
    ],
    ids=[
        "split-regex", "unknown-type", "nested-replace-regex", "growing-replace-chain",
        "long-replace-content", "long-sequence", "long-template", "special-token-of-many-ids",
        "wordpiece-word-length", "random-tokenization", "unicode-growth", "decoder-growth",
        "prepend-growth", "nested-components", "undeclared-special-token", "strip-decoder",
        "word-level-without-unknown",
    ],
)  # fmt: skip
def test_a_crafted_tokenizer_is_refused_at_load(
    text_bundle: Path, tmp_path: Path, change: Any, message: str
) -> None:
    import shutil

    from hostile import edit_json, repin

    from service.errors import BundleError

    bundle = tmp_path / "notes" / "1"
    shutil.copytree(text_bundle, bundle)
    edit_json(bundle / "tokenizer.json", change)
    repin(bundle, "tokenizer.json")
    with pytest.raises(BundleError) as e:
        load_bundle(bundle)
    assert e.value.message.startswith(f"{bundle}/tokenizer.json: {message}")


def test_a_strip_decoder_from_the_start_only_loads(text_bundle: Path, tmp_path: Path) -> None:
    """Llama-style decoders end in Strip(" ", 1, 0): it cannot panic and must load (refusing
    every Strip turned such bundles away)."""
    bundle = tmp_path / "notes" / "1"
    shutil.copytree(text_bundle, bundle)
    strip = {"type": "Strip", "content": " ", "start": 1, "stop": 0}
    edit_json(bundle / "tokenizer.json", lambda d: d.__setitem__("decoder", strip))
    repin(bundle, "tokenizer.json")
    assert load_bundle(bundle).tokenizer is not None


def test_a_panic_of_the_tokenizers_library_is_an_error_not_an_exit(text_bundle: Path) -> None:
    """pyo3's PanicException is a BaseException: it passed every `except Exception` (start-up,
    the poll loop, the compute process). At load the probe refuses the bundle; at serve time
    the encode and the word check answer a model error."""
    from tokenizers import Tokenizer

    from service.bundle.tokenizer import _probe, library_errors
    from service.engine.familiar import WordReader
    from service.engine.text import _encodings

    doc = json.loads((text_bundle / "tokenizer.json").read_text())
    single = [
        {"SpecialToken": {"id": "[X]", "type_id": 0}},
        {"Sequence": {"id": "A", "type_id": 0}},
    ]
    doc["post_processor"] = {
        "type": "TemplateProcessing", "single": single, "pair": [], "special_tokens": {}
    }  # fmt: skip
    panicking = Tokenizer.from_str(json.dumps(doc))  # past the allow-list: the library's own
    with pytest.raises(BundleError) as e, library_errors(BundleError, "tokenizer.json: probe"):
        _probe(panicking)
    assert e.value.message.startswith("tokenizer.json: probe (the library panicked: ")
    with pytest.raises(ModelError) as m:
        list(_encodings(panicking, ["a text"], [6]))
    assert m.value.message.startswith("this model's tokenizer failed on a text (the library")

    class Decoding:  # a panic where the word check decodes ids
        def get_vocab_size(self, with_added_tokens: bool) -> int:
            return 10

        def decode_batch(self, rows: Any, skip_special_tokens: bool) -> Any:
            return panicking.encode("x")  # panics

    reader = WordReader.__new__(WordReader)
    reader.table, reader.skip, reader.tokenizer = None, frozenset(), Decoding()
    with pytest.raises(ModelError) as w:
        reader([[1, 2]])
    assert w.value.message.startswith("this model's tokenizer failed to read a text's words")


def test_a_causal_hint_without_its_mask_is_refused(tmp_path: Path) -> None:
    """Attention told `is_causal=True` but given no mask would attend to the future silently;
    refused at packaging, as torch refuses it."""

    class Causal(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(VOCAB, 16)
            self.attn = nn.MultiheadAttention(16, 2, dropout=0.1, batch_first=True)
            self.fc = nn.Linear(16, 2)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            x = self.emb(tokens)
            out, _ = self.attn(x, x, x, need_weights=False, is_causal=True)
            return self.fc(out.mean(dim=1))

    with pytest.raises(ModelError, match="is_causal needs the causal mask itself"):
        save(
            Causal().eval(), token_batch(), out_dir=tmp_path, name="c", version="1",
            task="classification", intended_use="t", labels=["a", "b"],
        )  # fmt: skip


@pytest.fixture(scope="module")
def worded_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return save(
        TextCNN().eval(), token_batch(), out_dir=tmp_path_factory.mktemp("words"), name="notes",
        version="1", task="classification", intended_use="tests", labels=["a", "b", "c"],
        tokenizer=wordpiece(CORPUS), training_texts=CORPUS,
    )  # fmt: skip


def test_the_training_texts_words_travel_in_the_bundle(worded_bundle: Path) -> None:
    from service.engine.familiar import familiar_words

    loaded = load_bundle(worded_bundle)
    spec = loaded.manifest.inputs.text
    assert spec is not None and spec.words is not None
    assert loaded.manifest.artifacts[spec.words.file].role == "words"
    want = familiar_words(loaded.tokenizer, CORPUS, spec.words.min_texts)
    assert want and loaded.words == frozenset(want) and spec.words.count == len(want)
    # No training text is stored: only the words of at least two texts.
    assert (worded_bundle / spec.words.file).read_text().split("\n")[:-1] == want
    with pytest.raises(ModelError, match="training_texts= is for text models"):
        save(
            TextCNN().eval(), token_batch().float(), out_dir=worded_bundle.parent, name="x",
            version="2", task="classification", intended_use="tests", labels=["a", "b", "c"],
            training_texts=CORPUS,
        )  # fmt: skip


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("hostile_line", "line 1 ('<script>alert(1)</script>') is not a word"),
        ("unnamed", "a word list is listed but inputs.text.words does not name it"),
        ("other_file", "inputs.text.words 'tokenizer.json' is not the listed word list"),
    ],
)
def test_a_tampered_word_list_is_refused(
    worded_bundle: Path, tmp_path: Path, change: str, message: str
) -> None:
    b = tmp_path / "b"
    shutil.copytree(worded_bundle, b)
    if change == "hostile_line":
        (b / "words.txt").write_text("<script>alert(1)</script>\n")
        repin(b, "words.txt")
        edit_json(b / "manifest.json", lambda m: m["inputs"]["text"]["words"].update(count=1))
    elif change == "unnamed":
        edit_json(b / "manifest.json", lambda m: m["inputs"]["text"].update(words=None))
    else:
        edit_json(
            b / "manifest.json",
            lambda m: m["inputs"]["text"]["words"].update(file="tokenizer.json"),
        )
    with pytest.raises(BundleError, match=re.escape(message)):
        load_bundle(b)


def test_unigram_pieces_are_bounded_and_long_bpe_tokens_are_not() -> None:
    """A 20,000-character Unigram piece made one 100 kB word take 27 s (every piece that fits
    a word is in its lattice); a long BPE token (a run of "=" merged by a default trainer) costs
    nothing of the kind and is kept."""
    from service.bundle.tokenizer import check_tokenizer_json
    from service.errors import BundleError

    def doc(model: dict[str, Any]) -> bytes:
        return json.dumps({"version": "1.0", "model": model}).encode()

    unigram = {"type": "Unigram", "unk_id": 0, "vocab": [["<unk>", 0.0], ["x" * 300, -1.0]]}
    with pytest.raises(BundleError, match="a Unigram piece of 300 characters, over 256"):
        check_tokenizer_json(doc(unigram), "tokenizer.json")
    bpe = {"type": "BPE", "vocab": {"=": 0, "=" * 400: 1}, "merges": []}
    check_tokenizer_json(doc(bpe), "tokenizer.json")  # no BundleError


def test_explicit_attention_returns_the_weights_after_their_dropout() -> None:
    """torch returns the dropped attention weights in train mode (the reviewer's t7 case)."""
    from service.bundle.sequence import ExplicitAttention

    torch.manual_seed(0)
    att = ExplicitAttention.of(nn.MultiheadAttention(8, 2, dropout=0.5, batch_first=True))
    x = torch.randn(3, 5, 8)
    torch.manual_seed(1)
    out, w = att.train()(x, x, x, average_attn_weights=False)
    assert w is not None and bool((w == 0).any())  # dropped entries
    v = att.v_proj(x).view(3, 5, 2, 4).transpose(1, 2)
    assert torch.allclose(out, att.out_proj(torch.matmul(w, v).transpose(1, 2).reshape(3, 5, 8)))
    torch.manual_seed(1)
    _, mean = att(x, x, x)
    assert mean is not None and torch.allclose(mean, w.mean(dim=1))


class _WithState(nn.Module):
    def __init__(self, mode: str, bidirectional: bool) -> None:
        super().__init__()
        self.lstm = mode == "LSTM"  # (save swaps the layer: isinstance would not tell)
        cls = nn.LSTM if self.lstm else nn.GRU
        self.rnn = cls(
            5, 6, num_layers=3, dropout=0.3, batch_first=True, bidirectional=bidirectional
        )
        self.h0 = nn.Parameter(torch.randn(6 if bidirectional else 3, 1, 6))
        self.d, self.o = nn.Dropout(0.2), nn.Linear(12 if bidirectional else 6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h0 = self.h0.expand(-1, x.size(0), -1).contiguous()
        out, _ = self.rnn(x, (h0, torch.tanh(h0)) if self.lstm else h0)
        return self.o(self.d(out[:, -1]))


@pytest.mark.parametrize(("mode", "bidirectional"), [("LSTM", False), ("GRU", True)])
def test_a_stacked_rnn_called_with_its_initial_state_packages(
    tmp_path: Path, mode: str, bidirectional: bool
) -> None:
    """StackedRNN.forward took no state: `self.lstm(x, (h0, c0))` was refused as a branch."""
    torch.manual_seed(0)
    model = _WithState(mode, bidirectional).eval()
    x = torch.randn(4, 7, 5)
    path = save(
        model, x, out_dir=tmp_path, name="m", version="1", task="classification",
        labels=["a", "b"], intended_use="tests",
    )  # fmt: skip
    loaded = load_bundle(path)
    with torch.no_grad():
        assert torch.allclose(loaded.module(x), model(x), atol=1e-5)
    samples = ServedModel(loaded).sampler.run([MCRequest(x.numpy(), 16, 3)])[0]
    assert samples.shape == (16, 4, 2) and bool(np.isfinite(samples).all())
    assert float(samples.std(0).max()) > 0  # the between-layer dropout is sampled
