"""Familiar words: how much of a text is made of words the model saw in its training texts.

MC dropout barely notices a text that is not like the training texts (non-medical prose given to
a model of medical abstracts: mutual information AUROC 0.60, docs/evaluation/ood.md): a network
that never saw such words has nothing in them to be unsure about. The text analogue of a tabular
feature outside its training range is a simpler signal: the share of the text's words that never
appeared in the training texts. The bundle lists the words found in at least `min_texts`
distinct training texts (`words.txt`, role "words"; 2 by default, so that a word of a single text
is never stored; distinct texts are not distinct patients: for clinical notes raise it, or write
no list, docs/BUNDLES.md); calibration sets the share above which a text is referred
(`ReferralPolicy.unfamiliar_words`).

Words are read from the token ids (what the model reads, after truncation), through the bundle's
tokenizer: decoded, normalised like the training texts, then maximal runs of letters, casefolded.
Training and serving use the same function, so a word is spelt the same way on both sides. An
unknown-token id counts as one unfamiliar word. A text with no word at all (only digits or
punctuation) has share 1: nothing in it is familiar. A text cut at the model's maximum tokens may
end in part of a word, which then counts as unfamiliar (calibration reads texts the same way).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from service.bundle.load import LoadedBundle
from service.bundle.tokenizer import library_errors, unknown_token_id
from service.bundle.words import MAX_WORD_CHARS
from service.errors import ModelError

_WORD = re.compile(r"[^\W\d_]+")  # runs of letters (any script): linear, no backtracking


def _special_ids(tokenizer: Any) -> frozenset[int]:
    """Ids that are never words: registered special tokens and what the post-processor adds
    ([CLS], [SEP], ...; a request is encoded with them, the training texts without)."""
    added = tokenizer.get_added_tokens_decoder()
    ids = {i for i, t in added.items() if t.special}
    return frozenset(ids | set(tokenizer.encode("", add_special_tokens=True).ids))


class WordReader:
    """Token ids -> words, for one tokenizer.

    WordPiece (ours): from a table of each id's text, a space before a piece that starts a word,
    none before a continuation ("##") piece, a space for an unknown or special token; the row's
    texts joined are its words. That is what WordPiece decoding does, without its punctuation
    clean-up (which only moves spaces next to signs, never inside a run of letters), in a
    seventh of the time (bench/familiar.py): this runs per served text. Other models: the
    tokenizer's own decoder, then its normaliser (their pieces need not be normalised text)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.unknown_id = unknown_token_id(tokenizer)
        self.skip = _special_ids(tokenizer) | {self.unknown_id}  # unknown: counted apart
        self.table: np.ndarray | None = None
        if type(tokenizer.model).__name__ == "WordPiece":
            prefix = tokenizer.model.continuing_subword_prefix
            table = []
            for i in range(tokenizer.get_vocab_size(with_added_tokens=True)):
                piece = tokenizer.id_to_token(i)
                if piece is None or i in self.skip:
                    table.append(" ")
                elif prefix and piece.startswith(prefix):
                    table.append(piece[len(prefix) :])
                else:
                    table.append(" " + piece)
            # Ids past the vocabulary (an embedding larger than the tokenizer's, ids sent
            # directly): the last entry, a gap, like an unknown token.
            self.table = np.array([*table, " "], dtype=object)

    @classmethod
    def by_decoder(cls, tokenizer: Any) -> WordReader:
        """The same words read the slow way, through decoding (a WordPiece tokenizer saved
        without a decoder gets WordPiece's): the reference the table must equal (tests, bench)."""
        from tokenizers import Tokenizer, decoders

        copy = Tokenizer.from_str(tokenizer.to_str())
        prefix = getattr(copy.model, "continuing_subword_prefix", None)
        if copy.decoder is None and prefix:
            copy.decoder = decoders.WordPiece(prefix=prefix)
        reader = cls(copy)
        reader.table = None
        return reader

    def __call__(self, rows: Sequence[Sequence[int]] | np.ndarray) -> list[list[str]]:
        """The words of each row of ids (unknown and special tokens left out)."""
        if self.table is not None:
            last = len(self.table) - 1
            texts = ["".join(self.table[np.minimum(np.asarray(r, np.int64), last)]) for r in rows]
        else:
            skip, size = self.skip, self.tokenizer.get_vocab_size(with_added_tokens=True)
            kept = [[int(i) for i in r if int(i) not in skip and 0 <= int(i) < size] for r in rows]
            with library_errors(ModelError, "this model's tokenizer failed to read a text's words"):
                texts = self.tokenizer.decode_batch(kept, skip_special_tokens=True)
            norm = self.tokenizer.normalizer
            texts = [norm.normalize_str(t) if norm is not None else t for t in texts]
        # Casefolded before the split: casefolding can add a combining mark ("İ" -> "i" + U+0307),
        # which is no letter. isalpha: the regex also takes numeric letters such as "²"; words.txt
        # holds neither.
        return [[w for w in _WORD.findall(t.casefold()) if w.isalpha()] for t in texts]


def familiar_words(tokenizer: Any, texts: Iterable[str], min_texts: int) -> list[str]:
    """The words of at least ``min_texts`` distinct ``texts`` (all their tokens), sorted. A text
    repeated (a note copied forward, an abstract under two labels) counts once."""
    distinct = list(dict.fromkeys(texts))
    encodings = tokenizer.encode_batch(distinct, add_special_tokens=False)
    df: Counter[str] = Counter()
    for ws in WordReader(tokenizer)([e.ids for e in encodings]):
        df.update(set(ws))
    # A word longer than words.txt may hold is left out (it counts as unfamiliar): casefolding
    # lengthens some ("\ufb03" -> "ffi"), and a byte-level BPE has no word-length cap at all.
    return sorted(w for w, n in df.items() if n >= min_texts and len(w) <= MAX_WORD_CHARS)


class Familiarity:
    """The unfamiliar share of token-id rows, for one tokenizer and its word list."""

    def __init__(
        self, tokenizer: Any, words: frozenset[str], pad_id: int, min_texts: int = 2
    ) -> None:
        self.read = WordReader(tokenizer)
        self.words = words
        self.min_texts = min_texts  # as the list was made: for the reasons' wording
        self.pad_id = pad_id

    def counts(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per row of ``ids`` [B, T]: (unfamiliar words, words), unknown tokens counted in both."""
        ids = np.asarray(ids)
        rows = [r[r != self.pad_id] for r in ids.reshape(ids.shape[0], -1)]
        unk = self.read.unknown_id
        unknown = np.array([0 if unk is None else int((r == unk).sum()) for r in rows])
        per_row = self.read(rows)
        strange = np.array([sum(w not in self.words for w in ws) for ws in per_row]) + unknown
        total = np.array([len(ws) for ws in per_row]) + unknown
        return strange, total

    def share(self, ids: np.ndarray) -> np.ndarray:
        """Per row [B]: the share of its words not in the list (1.0 for a row without words)."""
        strange, total = self.counts(ids)
        return np.where(total > 0, strange / np.maximum(total, 1), 1.0)


def for_bundle(bundle: LoadedBundle) -> Familiarity | None:
    """The bundle's `Familiarity` (None: not a text model, or one without a word list)."""
    text = bundle.manifest.inputs.text
    if text is None or text.words is None or bundle.words is None or bundle.tokenizer is None:
        return None
    return Familiarity(bundle.tokenizer, bundle.words, text.pad_id, text.words.min_texts)
