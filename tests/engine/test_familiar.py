"""Familiar words (service/engine/familiar.py): the word list and the unfamiliar share."""

from __future__ import annotations

import numpy as np
import pytest

from service.engine.familiar import Familiarity, WordReader, familiar_words
from service.training.text_data import train_tokenizer

TEXTS = [
    "The cardiomyopathy patients improved.",
    "Patients with cardiomyopathy improved after surgery.",
    "A singular zebra.",
]


@pytest.fixture(scope="module")
def tok():  # type: ignore[no-untyped-def]
    t = train_tokenizer(TEXTS, 40)  # small: long words are split into pieces
    assert len(t.encode("cardiomyopathy", add_special_tokens=False).ids) > 1
    return t


def _ids(tok, text: str, length: int = 32) -> np.ndarray:  # type: ignore[no-untyped-def]
    ids = tok.encode(text, add_special_tokens=False).ids
    return np.array([ids + [0] * (length - len(ids))], dtype=np.int64)


def test_the_list_holds_words_of_two_texts_joined_from_their_pieces(tok) -> None:  # type: ignore[no-untyped-def]
    # "the", "with", "zebra" ... occur in one text only; a word split into pieces is one word.
    assert familiar_words(tok, TEXTS, 2) == ["cardiomyopathy", "improved", "patients"]
    assert "zebra" in familiar_words(tok, TEXTS, 1)


def test_the_share_counts_words_not_listed_and_ignores_padding(tok) -> None:  # type: ignore[no-untyped-def]
    f = Familiarity(tok, frozenset(familiar_words(tok, TEXTS, 2)), pad_id=0)
    two_of_four = _ids(tok, "Patients improved. Singular zebra.")
    assert f.share(two_of_four).tolist() == [0.5]
    assert f.share(_ids(tok, "Patients improved. Singular zebra.", 64)).tolist() == [0.5]
    strange, total = f.counts(two_of_four)
    assert (strange.tolist(), total.tolist()) == ([2], [4])
    assert f.share(_ids(tok, "cardiomyopathy patients")).tolist() == [0.0]


def test_unknown_tokens_are_unfamiliar_and_a_text_without_words_is_wholly_so(tok) -> None:  # type: ignore[no-untyped-def]
    f = Familiarity(tok, frozenset(familiar_words(tok, TEXTS, 2)), pad_id=0)
    unk = tok.token_to_id("[UNK]")
    ids = _ids(tok, "patients \u9f8d")  # a character the tokenizer never saw: [UNK]
    assert unk in ids[0].tolist()
    assert f.counts(ids)[0].tolist() == [1] and f.share(ids).tolist() == [0.5]
    assert f.share(_ids(tok, "12 34 %")).tolist() == [1.0]
    assert f.share(np.zeros((1, 8), dtype=np.int64)).tolist() == [1.0]  # padding only


EDGE = "Don't stop: b12 vitamin, m\u00b2, na\u00efve CAF\u00c9 \u9f8d! Cardiomyopathy."


def test_the_wordpiece_table_reads_what_decoding_reads(tok) -> None:  # type: ignore[no-untyped-def]

    fast, slow = WordReader(tok), WordReader.by_decoder(tok)
    rows = [tok.encode(t, add_special_tokens=False).ids for t in [*TEXTS, EDGE]]
    assert fast.table is not None and fast(rows) == slow(rows)
    # Words with a character the tokenizer never saw are [UNK] (counted apart), the rest read.
    assert fast(rows)[-1][-1] == "cardiomyopathy" and len(fast(rows)[-1]) >= 3


def _byte_level_bpe(texts: list[str]):  # type: ignore[no-untyped-def]
    """A GPT-2-style tokenizer (byte-level BPE, every byte in its alphabet) fitted on texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(), decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=300, show_progress=False, initial_alphabet=alphabet)
    bpe.train_from_iterator(texts, trainer)
    return bpe


def test_other_tokenizers_are_read_through_their_decoder() -> None:
    bpe = _byte_level_bpe(TEXTS)
    reader = WordReader(bpe)
    assert reader.table is None
    ids = bpe.encode("Patients improved. Singular Zebra!").ids
    assert reader([ids]) == [["patients", "improved", "singular", "zebra"]]
    assert familiar_words(bpe, TEXTS, 2) == ["cardiomyopathy", "improved", "patients"]


def test_a_repeated_text_counts_once(tok) -> None:  # type: ignore[no-untyped-def]
    # "zebra" is in one distinct text, twice over (a note copied forward): not listed.
    assert "zebra" not in familiar_words(tok, [*TEXTS, TEXTS[2]], 2)
    assert "zebra" in familiar_words(tok, [*TEXTS, TEXTS[2] + " Again."], 2)


def test_unknown_and_added_special_tokens_of_other_tokenizers() -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    uni = Tokenizer(models.Unigram())
    uni.pre_tokenizer = pre_tokenizers.Whitespace()
    uni.train_from_iterator(
        TEXTS, trainers.UnigramTrainer(vocab_size=60, unk_token="<unk>", show_progress=False)
    )
    f = Familiarity(uni, frozenset(familiar_words(uni, TEXTS, 2)), pad_id=-1)
    ids = np.array([uni.encode("patients \u9f8d\u9f8d improved").ids])
    assert f.read.unknown_id is not None and f.read.unknown_id in ids[0].tolist()
    assert f.counts(ids)[0].tolist() == [1]  # the unknown word, and nothing else
    # A post-processor's [CLS]/[SEP] (a request is encoded with them) are never words.
    wp = train_tokenizer(TEXTS, 40)
    wp.add_tokens(["[CLS]", "[SEP]"])
    cls_, sep = wp.token_to_id("[CLS]"), wp.token_to_id("[SEP]")
    wp.post_processor = processors.BertProcessing(("[SEP]", sep), ("[CLS]", cls_))
    g = Familiarity(wp, frozenset(familiar_words(wp, TEXTS, 2)), pad_id=0)
    row = np.array([wp.encode("patients improved", add_special_tokens=True).ids])
    assert row[0, 0] == cls_ and g.counts(row)[1].tolist() == [2] and g.share(row).tolist() == [0.0]


def test_ids_past_the_tokenizers_vocabulary_are_gaps(tok) -> None:  # type: ignore[no-untyped-def]
    # An embedding may be larger than the tokenizer; such ids can be sent directly (in range).
    f = Familiarity(tok, frozenset(familiar_words(tok, TEXTS, 2)), pad_id=0)
    big = tok.get_vocab_size() + 5
    ids = _ids(tok, "patients improved")
    ids[0, 5] = big
    assert f.counts(ids)[1].tolist() == [2]

    slow = WordReader.by_decoder(tok)
    assert slow([ids[0][ids[0] != 0]]) == WordReader(tok)([ids[0][ids[0] != 0]])


def test_casefolding_that_adds_a_mark_still_gives_words_the_bundle_accepts() -> None:
    from service.bundle.words import dump_words, read_words

    texts = ["\u0130stanbul and \u0390 were named.", "\u0130stanbul and \u0390 again."]
    bpe = _byte_level_bpe(texts)
    words = familiar_words(bpe, texts, 2)
    assert "stanbul" in words and "and" in words  # "İ" casefolds to "i" + U+0307: split there
    assert read_words(dump_words(words), "words.txt", len(words)) == frozenset(words)


def test_a_word_longer_than_the_list_may_hold_is_left_out() -> None:
    """A 90-character WordPiece word of ligatures casefolds to 270 letters: the list held it,
    its own loader refused it, and `train` failed after training (the version removed)."""
    from service.bundle.words import MAX_WORD_CHARS, dump_words, read_words

    long = "\ufb03" * 90
    texts = [f"the patient had {long} today", f"another {long} note"]
    texts += [f"patient note number {i}" for i in range(10)]
    tok = train_tokenizer(texts)
    words = familiar_words(tok, texts, 2)
    assert "patient" in words and max(map(len, words)) <= MAX_WORD_CHARS
    assert read_words(dump_words(words), "words.txt", len(words)) == frozenset(words)
