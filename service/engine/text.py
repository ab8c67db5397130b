"""Texts to token ids for a text model, or a message that says exactly what is wrong.

Every text is padded to the model's `max_tokens` (one fixed shape, so a text's answer cannot
depend on what shares its batch); longer texts are cut, keeping its template's special tokens
(policy `truncate`, reported per text), or refused (`error`). Cheap checks (type, size, NUL
bytes, emptiness) come before tokenization.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.bundle.spec import TextInput
from service.bundle.tokenizer import library_errors, unknown_token_id
from service.errors import InvalidInputError, ModelError, PayloadTooLargeError


@dataclass(frozen=True)
class TextBatch:
    """ids [B, max_tokens] int64; per text the token count before cutting, and whether cut."""

    ids: np.ndarray
    tokens: list[int]
    truncated: list[bool]

    def notes(self) -> list[dict[str, Any]]:
        """Per text, what a prediction reports of its tokenization."""
        return [
            {"tokens": n, "truncated": cut}
            for n, cut in zip(self.tokens, self.truncated, strict=True)
        ]


def _text_of(i: int, inst: Any) -> str:
    if isinstance(inst, dict):
        if set(inst) != {"text"}:
            raise InvalidInputError(
                f'instance {i}: a text instance is a string or {{"text": "..."}}'
            )
        inst = inst["text"]
    if not isinstance(inst, str):
        raise InvalidInputError(
            f"instance {i}: expected a string of text, got "
            f"{'null' if inst is None else type(inst).__name__}"
        )
    return inst


def checked_texts(
    instances: Any, spec: TextInput, max_instances: int, item: str = "instance"
) -> list[str]:
    """The texts of the instances (strings or {"text": ...}), counted, each checked for what
    needs no tokenizer (its size, NUL, blank, a lone surrogate): the adapters call this before
    the queue's room is checked, so a malformed text is a 4xx, not a 429 to retry."""
    if not isinstance(instances, list) or not instances:
        raise InvalidInputError("'instances' must be a non-empty list of texts")
    if len(instances) > max_instances:
        raise PayloadTooLargeError(
            f"{len(instances)} instances in one request; the limit is {max_instances} "
            "(setting max_instances): split the request"
        )
    texts = [_text_of(i, inst) for i, inst in enumerate(instances)]
    for i, t in enumerate(texts):
        size = len(t.encode("utf-8", "surrogatepass"))
        if size > spec.max_text_bytes:
            raise PayloadTooLargeError(
                f"{item} {i}: the text is {size} bytes, over this model's limit of "
                f"{spec.max_text_bytes}: shorten it or split it"
            )
        if "\x00" in t:
            raise InvalidInputError(f"{item} {i}: the text contains a NUL character")
        if not t.strip():
            raise InvalidInputError(f"{item} {i}: the text is empty (or only whitespace)")
        try:
            t.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidInputError(
                f"{item} {i}: the text is not valid Unicode (a lone surrogate)"
            ) from None
    return texts


def encode_texts(
    instances: Sequence[Any],
    tokenizer: Any,
    spec: TextInput,
    max_instances: int,
    item: str = "instance",
    *,
    plain_cut: bool = False,
) -> TextBatch:
    """Token ids of the texts; each refusal names the text as `item` and its index (/v2 says
    "input 'input', element", where /v1's "instance" named nothing the caller sent)."""
    texts = checked_texts(instances, spec, max_instances, item)
    sizes = [len(t.encode("utf-8", "surrogatepass")) for t in texts]
    limit = spec.max_tokens
    ids = np.full((len(texts), limit), spec.pad_id, dtype=np.int64)
    counts, cuts = [], []
    unknown = unknown_token_id(tokenizer)  # once a request, not once a text
    for i, enc in _encodings(tokenizer, texts, sizes):
        n = len(enc.ids)
        if n == sum(enc.special_tokens_mask):  # only [CLS]/[SEP]-like tokens, or none at all
            raise InvalidInputError(
                f"{item} {i}: the text has no token this model reads (its tokenizer drops "
                "every character: zero-width, combining or control characters); send words"
            )
        words = [t for t, sp in zip(enc.ids, enc.special_tokens_mask, strict=True) if not sp]
        if unknown is not None and all(t == unknown for t in words):
            raise InvalidInputError(
                f"{item} {i}: none of the text's {len(words)} token(s) is in this model's "
                "vocabulary (every one is unknown: another language or script?); the model "
                "cannot read it"
            )
        if n > limit and spec.truncation == "error":
            raise InvalidInputError(
                f"{item} {i}: {n} tokens, over this model's maximum of {limit} (truncation "
                "policy 'error'): shorten the text"
            )
        # plain_cut: as the server cut before 2026-12-07 (an audit replay of its records)
        take = enc.ids[:limit] if plain_cut else cut(enc.ids, enc.special_tokens_mask, limit)
        ids[i, : len(take)] = take
        counts.append(n)
        cuts.append(n > limit)
    return TextBatch(ids, counts, cuts)


def cut(ids: list[int], special: list[int], limit: int) -> list[int]:
    """A text's first `limit` ids, keeping the special tokens its tokenizer's template put around
    it: [CLS] ... [SEP] stays [CLS] ... [SEP], as the library's own truncation (the usual way a
    model is trained) cuts it; cutting the ids as they came dropped the closing [SEP] and served
    a long text ids its model never saw. `special`: the encoding's special-tokens mask."""
    if len(ids) <= limit:
        return ids
    head = 0
    while head < len(ids) and special[head]:
        head += 1
    tail = 0
    while tail < len(ids) - head and special[len(ids) - 1 - tail]:
        tail += 1
    room = limit - head - tail
    if room < 0:  # a limit under the template's own length (the library then cuts nothing)
        return ids[:limit]
    return ids[: head + room] + ids[len(ids) - tail :]


# Texts tokenized at once, in UTF-8 bytes. A token holds all its offsets, strings and masks
# (about 60 bytes of memory per byte of text): the 80 texts of an 8 MB body took 0.5 GB at
# once. In groups of at most this size (or one text), a request holds about 60 MB; the
# library still tokenizes a group's texts in parallel.
TOKENIZE_BYTES = 1 << 20


def _encodings(tokenizer: Any, texts: list[str], sizes: list[int]) -> Iterator[tuple[int, Any]]:
    """(index, encoding) of each text, in order, a group of texts at a time."""
    start = 0
    while start < len(texts):
        end, total = start + 1, sizes[start]
        while end < len(texts) and total + sizes[end] <= TOKENIZE_BYTES:
            total += sizes[end]
            end += 1
        with library_errors(ModelError, "this model's tokenizer failed on a text"):
            group = tokenizer.encode_batch(texts[start:end], add_special_tokens=True)
        yield from enumerate(group, start)
        del group  # before the next group is made
        start = end
