"""Pretrained word vectors for a text network's embedding (`train --word-vectors FILE`).

The file is GloVe's text format: one word per line followed by its numbers, separated by
spaces (word2vec's text format, whose first line is "<count> <dimensions>", is read too). Only
the words the tokenizer can use are kept, so a 400,000-word file costs the memory of a few
thousand vectors. A WordPiece entry is looked up when it is a whole word (not a "##"
continuation) as it stands, then lowercased; entries no vector covers, and every entry when the
file covers none, keep a random start drawn with the vectors' own spread (a default N(0, 1)
start would be twice as long as GloVe's vectors and dominate the average). The padding row
stays zero. Training then fine-tunes all of them.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from service.errors import InvalidInputError
from service.training.table import numeric


@dataclass(frozen=True)
class WordVectors:
    vectors: dict[str, np.ndarray]  # word -> float32 [dim]
    dim: int
    source: str  # file name, or what the vectors are
    sha256: str

    def lookup(self, entry: str) -> np.ndarray | None:
        if entry.startswith("##"):
            return None
        found = self.vectors.get(entry)
        return found if found is not None else self.vectors.get(entry.lower())

    def describe(self, covered: int, vocab: int) -> dict[str, object]:
        return {
            "source": self.source,
            "sha256": self.sha256,
            "dimensions": self.dim,
            "vocabulary_entries_initialised": f"{covered} of {vocab}",
        }


def read_vectors(path: Path, wanted: set[str] | None = None) -> WordVectors:
    """The vectors of `path` (GloVe text format), only for `wanted` words (lowercase match
    too) when given. Errors name the line and say what a line should look like."""
    if not path.is_file():
        raise InvalidInputError(f"--word-vectors {path}: no such file")
    keep = None if wanted is None else wanted | {w.lower() for w in wanted}
    digest = hashlib.sha256()
    vectors: dict[str, np.ndarray] = {}
    dim = first = 0
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            digest.update(raw)
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise InvalidInputError(
                    f"--word-vectors {path.name}: line {number} is not UTF-8 ({e.reason} at "
                    f"byte {e.start}); save the file as UTF-8"
                ) from None
            text = line.rstrip(" ")
            if not text.strip():
                continue
            if number == 1 and _header(text):
                continue  # word2vec's header: "<count> <dimensions>"
            if dim == 0:
                dim, first = len(text.split(" ")) - 1, number
                if dim == 0:
                    raise InvalidInputError(_bad(path, number, "has a word and no numbers"))
            # From the right: a word may hold spaces (glove.840B's ". . .").
            word, *numbers = text.rsplit(" ", dim)
            if len(numbers) != dim or (numeric(word.rsplit(" ", 1)[-1]) and " " in word):
                count = len(numbers) if len(numbers) != dim else "more"
                raise InvalidInputError(
                    _bad(path, number, f"has {count} numbers where line {first} had {dim}")
                )
            if keep is not None and word not in keep:
                continue
            try:
                values = np.array([float(v) for v in numbers], dtype=np.float32)
            except ValueError:
                what = "holds a value that is not a number"
                raise InvalidInputError(_bad(path, number, what)) from None
            if not np.isfinite(values).all():
                raise InvalidInputError(_bad(path, number, "holds NaN or infinity"))
            vectors.setdefault(word, values)  # the first of duplicate words, as GloVe's tools do
    if dim == 0:
        raise InvalidInputError(f"--word-vectors {path.name}: the file holds no vectors")
    return WordVectors(vectors, dim, path.name, digest.hexdigest())


def _header(text: str) -> bool:
    parts = text.split(" ")
    return len(parts) == 2 and all(p.isdigit() for p in parts)


def _bad(path: Path, number: int, what: str) -> str:
    return (
        f"--word-vectors {path.name}: line {number} {what}; each line should be a word and its "
        "numbers separated by single spaces (GloVe's text format)"
    )


def initialise(emb: nn.Embedding, vocab: dict[str, int], wv: WordVectors, pad: int) -> int:
    """Copy `wv` into the rows of `emb` whose vocabulary entry it covers; the rest random with
    the vectors' spread (global torch generator: seeded by the caller). Returns the rows set."""
    if emb.embedding_dim != wv.dim:
        raise InvalidInputError(
            f"--word-vectors: the vectors have {wv.dim} dimensions, the embedding "
            f"{emb.embedding_dim}"
        )
    found = {i: v for t, i in vocab.items() if i != pad and (v := wv.lookup(t)) is not None}
    spread = float(np.std(np.stack(list(found.values())))) if found else 1.0 / math.sqrt(wv.dim)
    with torch.no_grad():
        emb.weight.normal_(0.0, spread)
        for i, v in found.items():
            emb.weight[i] = torch.as_tensor(v)
        emb.weight[pad] = 0.0
    return len(found)
