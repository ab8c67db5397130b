"""Texts to ids (service/engine/text.py): what the text itself holds, and bounded memory."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from text_nets import CORPUS
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

from service.bundle.spec import TextInput
from service.engine import text
from service.engine.text import encode_texts
from service.errors import InvalidInputError


def _readme_tokenizer() -> Any:
    """As README and docs/BUNDLES.md show: [PAD] and [UNK] registered as special tokens."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[PAD]", "[UNK]"])
    tok.train_from_iterator(CORPUS, trainer)
    assert tok.token_to_id("[PAD]") == 0
    return tok


SPEC = TextInput(tokenizer="tokenizer.json", max_tokens=16, pad_id=0)


class Counting:
    """A tokenizer that records the UTF-8 bytes of each batch it is given."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.batches = inner, []  # type: ignore[var-annotated]

    def encode_batch(self, texts: list[str], **kw: Any) -> Any:
        self.batches.append([len(t.encode()) for t in texts])
        return self.inner.encode_batch(texts, **kw)


def test_texts_are_tokenized_a_bounded_group_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """The 80 texts of an 8 MB body were tokenized at once: 0.5 GB of encodings in memory (60
    bytes a byte of text). In groups of at most TOKENIZE_BYTES (or one text): the same ids."""
    tok = _readme_tokenizer()
    monkeypatch.setattr(text, "TOKENIZE_BYTES", 2_000)
    spec = SPEC.model_copy(update={"max_text_bytes": 10_000})
    texts = [("chest pain " * (k % 7 * 40 + 1)).strip() for k in range(12)]
    counting = Counting(tok)
    batch = encode_texts(texts, counting, spec, 16)
    assert sum(map(len, counting.batches)) == 12
    assert all(sum(b) <= 2_000 or len(b) == 1 for b in counting.batches)
    assert len(counting.batches) > 1
    whole = [tok.encode(t).ids for t in texts]
    assert batch.tokens == [len(w) for w in whole]
    want = np.zeros((12, 16), dtype=np.int64)
    for row, w in zip(want, whole, strict=True):
        row[: min(16, len(w))] = w[:16]
    assert np.array_equal(batch.ids, want)


def test_a_bundles_tokenizer_reads_special_tokens_in_a_text_as_text() -> None:
    """'[PAD] chest pain' was tokenized to the padding id first: the model masked it (another
    answer than 'chest pain'), and '[PAD]' alone gave NaN, a 200 with null probabilities."""
    from service.bundle.tokenizer import load_tokenizer

    raw = _readme_tokenizer()
    tok = load_tokenizer(raw.to_str().encode(), "tokenizer.json")
    ids = tok.encode("[PAD] chest pain").ids  # "[", "pa", "##d", "]", "chest", "pain"
    assert 0 not in ids and ids[-2:] == tok.encode("chest pain").ids and len(ids) == 6
    assert raw.encode("[PAD] chest pain").ids[0] == 0  # as the library reads it by default
    batch = encode_texts(["[PAD] chest pain"], tok, SPEC, 8)
    assert batch.tokens == [6] and (batch.ids[0, :6] != 0).all()


def test_a_unigram_tokenizers_all_unknown_text_is_refused() -> None:
    """A Unigram model has no unk_token attribute (its unk_id is in its JSON): the check that
    a text has a word the model reads skipped such tokenizers, and an all-unknown text got a
    200 answered from [UNK]s alone."""
    from service.bundle.tokenizer import load_tokenizer

    raw = Tokenizer(models.Unigram())
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.UnigramTrainer(
        vocab_size=80, special_tokens=["<pad>", "<unk>"], unk_token="<unk>", show_progress=False
    )
    raw.train_from_iterator(CORPUS, trainer)
    tok = load_tokenizer(raw.to_str().encode(), "tokenizer.json")
    unk = tok.token_to_id("<unk>")
    assert tok.encode("\u9f8d\u9f8d \u9f8d").ids == [unk, unk]  # each word one unknown token
    with pytest.raises(InvalidInputError, match="none of the text's 2 token"):
        encode_texts(["\u9f8d\u9f8d \u9f8d"], tok, SPEC, 8)
    batch = encode_texts(["chest pain \u9f8d"], tok, SPEC, 8)  # one word read: served
    assert unk in batch.ids[0].tolist() and batch.tokens[0] > 1


def test_a_long_text_keeps_its_templates_special_tokens_as_the_librarys_truncation() -> None:
    """A [CLS] $A [SEP] template: the ids were cut as they came, so a long text lost its
    closing [SEP] and was served ids its model never saw (trained with the library's own
    truncation, which cuts the text and keeps the template's tokens)."""
    from tokenizers import processors

    from service.bundle.tokenizer import load_tokenizer

    raw = _readme_tokenizer()
    raw.add_special_tokens(["[CLS]", "[SEP]"])
    cls_, sep = raw.token_to_id("[CLS]"), raw.token_to_id("[SEP]")
    raw.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_), ("[SEP]", sep)]
    )
    tok = load_tokenizer(raw.to_str().encode(), "tokenizer.json")
    trained = Tokenizer.from_str(raw.to_str())
    trained.enable_truncation(max_length=SPEC.max_tokens)  # the usual training setup
    texts = ["chest pain " * 30, "chest pain", "acute chest pain " * 5]
    batch = encode_texts(texts, tok, SPEC, 8)
    for row, t, n in zip(batch.ids, texts, batch.tokens, strict=True):
        want = trained.encode(t).ids
        assert row[: len(want)].tolist() == want and (row[len(want) :] == 0).all()
        assert want[0] == cls_ and want[-1] == sep
        assert n == len(tok.encode(t).ids)  # the count before cutting, as reported
    assert batch.truncated == [True, False, True]
    # No room for the text: the template's tokens alone, as the library gives; a limit under
    # the template's length: a plain cut (the library would give more ids than the limit).
    assert text.cut([1, 5, 6, 7, 2], [1, 0, 0, 0, 1], 2) == [1, 2]
    assert text.cut([1, 5, 6, 7, 2], [1, 0, 0, 0, 1], 1) == [1]
    trained.enable_truncation(max_length=2)
    enc = tok.encode("chest pain " * 3)
    assert text.cut(enc.ids, enc.special_tokens_mask, 2) == trained.encode("chest pain " * 3).ids
