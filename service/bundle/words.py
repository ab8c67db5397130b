"""A text bundle's word list (`words.txt`, role "words"): the words of its training texts.

Plain UTF-8 text, one word per line, sorted and unique, each a run of letters (no spaces, digits
or punctuation), as `service.engine.familiar.familiar_words` writes it. Read as data, never as
code; checked so that a hand-edited or hostile file is refused at load with a reason rather than
silently turning the unfamiliar-text referral into nonsense.
"""

from __future__ import annotations

from collections.abc import Sequence

from service.errors import BundleError

MAX_WORDS = 2_000_000
MAX_WORD_CHARS = 200
MAX_BYTES = 32 * 1024 * 1024  # 2 M words of 15 bytes; bounds the memory a hostile file costs


def dump_words(words: Sequence[str]) -> bytes:
    """The file's bytes for sorted, unique ``words`` (a trailing newline; empty for none)."""
    return "".join(f"{w}\n" for w in words).encode("utf-8")


def read_words(raw: bytes, where: str, count: int) -> frozenset[str]:
    """The checked word set; ``count`` is the number the manifest declares."""
    # Sizes first, on the bytes: a hostile file must not cost memory before it is refused.
    if len(raw) > MAX_BYTES:
        raise BundleError(f"{where}: {len(raw)} bytes, over the limit of {MAX_BYTES}")
    lines = raw.count(b"\n")
    if lines > MAX_WORDS:
        raise BundleError(f"{where}: {lines} words, over the limit of {MAX_WORDS}")
    if lines != count:
        raise BundleError(f"{where}: {lines} words, the manifest declares {count}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BundleError(f"{where}: not UTF-8 text ({exc})") from exc
    if text and not text.endswith("\n"):
        raise BundleError(f"{where}: the last line must end with a newline")
    words = text.split("\n")[:-1] if text else []
    for i, w in enumerate(words):
        if not w or len(w) > MAX_WORD_CHARS or not w.isalpha() or w != w.casefold():
            raise BundleError(
                f"{where}: line {i + 1} ({w[:40]!r}) is not a word: each line holds one "
                f"casefolded run of letters, 1-{MAX_WORD_CHARS} characters"
            )
        if i and words[i - 1] >= w:
            raise BundleError(f"{where}: line {i + 1} ({w[:40]!r}) is out of order or repeated")
    return frozenset(words)
