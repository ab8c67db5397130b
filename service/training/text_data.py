"""Text training data: a CSV with a text column and a label column, fixed splits, a tokenizer.

The text column is `--text-column`, else detected: the one non-target column that is not
numeric and whose values are long (median over 30 characters, with spaces), or, in scripts
written without spaces between words (Chinese, Japanese, Thai, ...), mostly distinct values of
a median 10 characters or more. A detected column is taken only when it is the sole column
besides the target: with others, a text model would silently drop them, so `train` asks for
`--text-column` (text alone) or a file without the text column (a tabular model). The tokenizer
(WordPiece, lowercasing BERT normaliser) is trained on the training rows it is given and no
others: the caller passes only training texts, and the tests check that a word seen only in
calibration or test rows does not enter the vocabulary.
"""

from __future__ import annotations

import re
import shlex
import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.bundle.spec import TextInput
from service.calibration.csv_file import CsvFile, read_csv
from service.engine.text import cut
from service.errors import InvalidInputError
from service.training.table import check_column, numeric

SPLITS = ("train", "calibration", "test")
MIN_VOCAB, MAX_VOCAB = 256, 4000
PAD, UNK = "[PAD]", "[UNK]"
MAX_TEXT_BYTES: int = TextInput.model_fields["max_text_bytes"].default  # what a bundle serves


@dataclass(frozen=True)
class TextTable:
    path: Path
    sha256: str
    text_column: str
    texts: list[str]
    values: list[str]  # the target column, as written (stripped)
    file: CsvFile  # where each row is (`file.locate(i)`)


# Scripts written without spaces between words: CJK punctuation, kana, ideographs, full-width
# forms, Thai, Lao, Myanmar, Khmer. A Chinese abstract has no space for the test below to find.
UNSPACED = re.compile(
    "[\u3000-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef"
    "\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff]"
)


def _looks_like_text(values: list[str]) -> bool:
    if not values or all(numeric(v) for v in values):
        return False
    median = statistics.median(len(v) for v in values)
    if median > 30 and any(" " in v for v in values):
        return True
    # Unspaced scripts: shorter texts, so also mostly distinct (a category repeats).
    unspaced = sum(len(UNSPACED.findall(v)) for v in values) > sum(map(len, values)) / 2
    return unspaced and median >= 10 and len(set(values)) > len(values) / 2


def detect_text_column(path: Path, target: str) -> str | None:
    """The CSV's one long free-text column besides `target`, or None (a tabular CSV)."""
    return _detect(read_csv(path), target)


def _detect(f: CsvFile, target: str) -> str | None:
    found = [
        name
        for j, name in enumerate(f.header)
        if name != target and _looks_like_text([r[j] for r in f.rows[:200]])
    ]
    if len(found) > 1:
        raise InvalidInputError(
            f"{f.path}: columns {found} all look like free text; name one with --text-column"
        )
    return found[0] if found else None


def text_column(path: Path, target: str, given: str | None) -> str | None:
    """The column to train a text model on (``given``: `--text-column`), or None for a tabular
    model. A detected one is refused when the file has other columns besides the target: a text
    model would ignore them, and a tabular file with one column of notes had been trained on
    the notes alone."""
    if given is not None:
        return given
    f = read_csv(path)
    header = f.header
    if target not in header:
        return None  # said by the reader of the chosen kind, naming the columns
    found = _detect(f, target)
    others = [h for h in header if h not in (target, found)]
    if found is None or not others:
        return found
    raise InvalidInputError(
        f"{path}: the column {found!r} looks like free text, and a text model on it would ignore "
        f"the other columns {others}; to train on the text alone, pass --text-column "
        f"{shlex.quote(found)}; for a tabular model of the other columns, drop the column "
        f"{found!r} from the file"
    )


def read_text_table(path: Path, target: str, text_column: str) -> TextTable:
    """The texts and target values of a CSV, every text checked as a request's would be
    (`check_text`), so that no text fails only at calibration, after the training."""
    f = read_csv(path)
    header = f.header
    check_column(path, header, target, "target")
    check_column(path, header, text_column, "text")
    if target == text_column:
        raise InvalidInputError("--text-column and --target name the same column")
    texts, values = f.column(text_column), [v.strip() for v in f.column(target)]
    if len(texts) < 10:
        raise InvalidInputError(f"{path}: {len(texts)} data rows are too few to train on")
    words = _bare()
    for i, t in enumerate(texts):
        why = check_text(t, words)
        if why is not None:
            raise InvalidInputError(f"{f.locate(i)}: the text {text_column!r} {why}")
    return TextTable(path, f.sha256, text_column, texts, values, f)


def check_text(text: str, tok: Any) -> str | None:
    """What `encode_texts` would refuse in ``text`` (a served text model's checks), or None;
    ``tok``: a tokenizer with the normaliser and word splitter `train_tokenizer` gives."""
    size = len(text.encode("utf-8"))
    if size > MAX_TEXT_BYTES:
        return (
            f"is {size:,} bytes, over the {MAX_TEXT_BYTES:,} a text model takes (a request's "
            "limit); shorten it or split it"
        )
    if "\x00" in text:
        return "contains a NUL character; remove it"
    if not text.strip():
        return "is empty (or only whitespace)"
    # No word after normalising: no token either (WordPiece makes at least [UNK] of a word).
    if not tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(text)):
        return (
            "has no word a tokenizer reads (only zero-width, combining or control "
            "characters); give it words or drop the row"
        )
    return None


def read_splits(path: Path, n: int) -> dict[str, np.ndarray]:
    """A CSV `row,split` (row: 0-based data row of the training CSV; split: train, calibration
    or test) -> sorted row indices per split. Every row must be named exactly once."""
    f = read_csv(path)
    if f.header[:2] != ["row", "split"]:
        raise InvalidInputError(f"{path}: the header must be row,split (got {f.header})")
    parts: dict[str, list[int]] = {s: [] for s in SPLITS}
    seen = np.zeros(n, dtype=bool)
    for i, r in enumerate(f.rows):
        try:
            row, part = int(r[0]), r[1].strip()
        except ValueError:
            raise InvalidInputError(f"{f.locate(i)}: expected row,split, got {r}") from None
        if part not in parts:
            raise InvalidInputError(f"{f.locate(i)}: split {part!r} is not one of {SPLITS}")
        if not 0 <= row < n or seen[row]:
            what = "out of range" if not 0 <= row < n else "named twice"
            raise InvalidInputError(
                f"{f.locate(i)}: row {row} is {what} (0..{n - 1}; rows are 0-based: the first "
                "data row, after the header, is row 0)"
            )
        seen[row] = True
        parts[part].append(row)
    if not seen.all():
        raise InvalidInputError(
            f"{path}: {int((~seen).sum())} data rows have no split (first: row "
            f"{int(np.flatnonzero(~seen)[0])}); name every row"
        )
    if not parts["train"] or not parts["calibration"]:
        raise InvalidInputError(f"{path}: needs train and calibration rows")
    return {k: np.array(sorted(v), dtype=np.int64) for k, v in parts.items()}


def vocabulary_size(texts: list[str]) -> int:
    """A thirtieth of the distinct lowercase words, within [MIN_VOCAB, MAX_VOCAB]: frequent words
    stay whole, rare ones split into pieces that recur (about 1,000 for 1,741 medical abstracts;
    1,000, 2,000 and 4,000 entries did about equally well there, docs/MODELS.md)."""
    words = {w for t in texts for w in t.lower().split()}
    return int(min(MAX_VOCAB, max(MIN_VOCAB, len(words) // 30)))


def train_tokenizer(texts: list[str], vocab_size: int | None = None) -> Any:
    """A WordPiece tokenizer fitted on `texts` only ([PAD] = 0, [UNK] = 1), reproducibly.

    The vocabulary is chosen here rather than by the library's WordPieceTrainer: that trainer
    breaks ties between equally frequent merges in hash-map order, which changes from process to
    process, so the same rows gave different vocabularies (and weights) in two runs. Here every
    candidate piece is ranked by (frequency, then the piece itself): all characters (as first
    and as continuation "##" pieces), then the most frequent whole words, word beginnings (3-10
    characters) and "##" word endings (2-8 characters), frequencies weighted by how often each
    word occurs. Encoding is WordPiece's greedy longest match, as for any WordPiece vocabulary.
    """
    from tokenizers import models

    tok = _bare()
    size = vocab_size if vocab_size is not None else vocabulary_size(texts)
    words = _word_counts(tok, texts)
    chars: set[str] = set()
    pieces: Counter[str] = Counter()
    for w, n in words.items():
        chars.add(w[0])
        chars.update("##" + c for c in w[1:])
        pieces[w] += n
        for k in range(3, min(len(w) - 1, 10) + 1):
            pieces[w[:k]] += n
        for k in range(max(1, len(w) - 8), len(w) - 1):
            pieces["##" + w[k:]] += n
    base = [PAD, UNK, *sorted(chars)]
    ranked = sorted((p for p in pieces if p not in chars), key=lambda p: (-pieces[p], p))
    chosen = base + ranked[: max(0, size - len(base))]
    tok.model = models.WordPiece({t: i for i, t in enumerate(chosen)}, unk_token=UNK)
    return tok


def _bare() -> Any:
    """A WordPiece tokenizer with its normalizer and word splitter and no vocabulary yet."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    tok = Tokenizer(models.WordPiece({PAD: 0, UNK: 1}, unk_token=UNK))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return tok


def _word_counts(tok: Any, texts: list[str]) -> Counter[str]:
    """How often each word (as the tokenizer normalises and splits) occurs in `texts`."""
    words: Counter[str] = Counter()
    for t in texts:
        norm = tok.normalizer.normalize_str(t)
        words.update(w for w, _ in tok.pre_tokenizer.pre_tokenize_str(norm))
    return words


def training_words(texts: list[str]) -> set[str]:
    """The words `train_tokenizer(texts)` can make whole entries of (for `word_vectors`)."""
    return set(_word_counts(_bare(), texts))


def encode(tok: Any, texts: list[str], max_tokens: int) -> np.ndarray:
    """ids [N, max_tokens], padded with 0 and cut at max_tokens (as the service encodes)."""
    ids = np.zeros((len(texts), max_tokens), dtype=np.int64)
    for i, enc in enumerate(tok.encode_batch(texts, add_special_tokens=True)):
        take = cut(enc.ids, enc.special_tokens_mask, max_tokens)
        ids[i, : len(take)] = take
    return ids
