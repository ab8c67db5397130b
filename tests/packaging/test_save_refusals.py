"""`save` refuses what the loader would refuse, before anything is written: weights that are
not finite, BatchNorm without running statistics, token ids past the embedding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from nets import mlp
from text_nets import CORPUS, VOCAB, TextCNN, wordpiece
from torch import nn

from service.errors import ModelError
from service.packaging import save


def _save(module: nn.Module, example: torch.Tensor, out: Path, **kw: object) -> Path:
    return save(
        module, example, out_dir=out, name="m", version="1", task="classification",
        labels=["a", "b", "c"][: kw.pop("classes", 2)], intended_use="tests",  # type: ignore[misc]
        **kw,  # type: ignore[arg-type]
    )  # fmt: skip


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_weights_that_are_not_finite_are_refused_before_writing(
    tmp_path: Path, value: float
) -> None:
    torch.manual_seed(0)
    model = mlp(0.25)
    with torch.no_grad():
        model[0].weight[1, 2] = value
    with pytest.raises(ModelError) as e:
        _save(model, torch.randn(4, 6), tmp_path)
    n = model[0].weight.numel()
    assert e.value.message == (
        f"the module's weights: tensor '0.weight' holds {value} (1 of its {n} values are not "
        "finite); a model's weights are finite numbers: check the training run that made them "
        "(a diverged loss) and package weights from before it"
    )
    assert not (tmp_path / "m").exists()


def test_batch_norm_without_running_statistics_is_refused(tmp_path: Path) -> None:
    """The reviewer's: the same row answered 0.41 alone and 0.52 beside two others."""
    model = nn.Sequential(
        nn.Linear(4, 16), nn.BatchNorm1d(16, track_running_stats=False), nn.ReLU(),
        nn.Dropout(0.2), nn.Linear(16, 2),
    )  # fmt: skip
    with pytest.raises(ModelError) as e:
        _save(model, torch.randn(8, 4), tmp_path)
    assert e.value.message == (
        "the traced graph: layer '1' (BatchNorm1d): track_running_stats=False normalises with "
        "each batch's own statistics, in eval mode too, so an input's answer would depend on "
        "the inputs batched with it; train it with track_running_stats=True (the default), or "
        "use LayerNorm or GroupNorm"
    )
    assert not (tmp_path / "m").exists()


def test_a_tokenizer_larger_than_the_embedding_is_refused(tmp_path: Path) -> None:
    tok = wordpiece(CORPUS)
    rows = tok.get_vocab_size() - 1
    torch.manual_seed(0)
    model = TextCNN().eval()
    model.emb = nn.Embedding(rows, 24, padding_idx=0)
    ids = torch.randint(1, rows, (4, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ModelError) as e:
        _save(model, ids, tmp_path, classes=3, tokenizer=tok)
    assert e.value.message == (
        f"the tokenizer: makes ids up to {rows} but the embedding 'emb' has {rows} rows (ids "
        f"0..{rows - 1}); package the model with the tokenizer it was trained with (or an "
        "embedding as large as its vocabulary)"
    )
    assert not (tmp_path / "m").exists()


class Floored(nn.Module):
    """A buffer of -inf (a mask's usual value), not a learned weight: it must package."""

    def __init__(self) -> None:
        super().__init__()
        self.body = mlp(0.25)
        self.register_buffer("floor", torch.full((2,), float("-inf")))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.maximum(self.body(x), self.floor)


def test_an_infinite_buffer_is_not_a_weight(tmp_path: Path) -> None:
    from service.bundle.load import load_bundle

    torch.manual_seed(0)
    dest = _save(Floored().eval(), torch.randn(4, 6), tmp_path)
    loaded = load_bundle(dest)
    assert torch.isinf(loaded.module.state_dict()["floor"]).all()
    nan = Floored()
    nan.floor.fill_(float("nan"))  # type: ignore[operator]
    with pytest.raises(ModelError) as e:
        _save(nan.eval(), torch.randn(4, 6), tmp_path / "nan")
    assert "tensor 'floor' holds nan (2 of its 2 values are NaN)" in e.value.message


def test_a_tokenizer_without_a_padding_token_needs_pad_id(tmp_path: Path) -> None:
    """Padding defaulted to id 0: in a byte-level BPE that is "!", so every text with one was
    masked where it said it (the reviewer's "Sudden chest pain!")."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator(
        CORPUS, trainers.BpeTrainer(vocab_size=VOCAB, initial_alphabet=alphabet)
    )
    assert tok.id_to_token(0) == "!"
    ids = torch.ones(4, 16, dtype=torch.int64)
    with pytest.raises(ModelError) as e:
        _save(TextCNN(), ids, tmp_path, tokenizer=tok)
    assert e.value.message == (
        "the tokenizer has no [PAD] or <pad> token: pass pad_id, the id the model pads with "
        "(one no text encodes to)"
    )
    assert not (tmp_path / "m").exists()
