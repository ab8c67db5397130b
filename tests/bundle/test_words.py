"""A text bundle's word list (service/bundle/words.py): written canonically, read strictly."""

from __future__ import annotations

import pytest

from service.bundle.words import dump_words, read_words
from service.errors import BundleError


def test_round_trip() -> None:
    words = ["artery", "heart", "\u00e9tude"]
    raw = dump_words(words)
    assert raw == "artery\nheart\n\u00e9tude\n".encode()
    assert read_words(raw, "w", 3) == frozenset(words)
    assert read_words(b"", "w", 0) == frozenset()


@pytest.mark.parametrize(
    ("raw", "count", "message"),
    [
        (b"\xff\xfe\n", 1, "not UTF-8"),
        (b"artery\nheart", 1, "must end with a newline"),
        (b"artery\n", 2, "1 words, the manifest declares 2"),
        (b"heart\nartery\n", 2, "out of order or repeated"),
        (b"heart\nheart\n", 2, "out of order or repeated"),
        (b"heart rate\n", 1, "is not a word"),
        (b"b12\n", 1, "is not a word"),
        (b"Heart\n", 1, "is not a word"),
        (b"\n", 1, "is not a word"),
        (b"<script>\n", 1, "is not a word"),
    ],
)
def test_a_bad_file_is_refused_with_the_reason(raw: bytes, count: int, message: str) -> None:
    with pytest.raises(BundleError, match=message):
        read_words(raw, "bundle/words.txt", count)


def test_sizes_are_checked_on_the_bytes_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.bundle import words

    monkeypatch.setattr(words, "MAX_BYTES", 10)
    with pytest.raises(BundleError, match="11 bytes, over the limit of 10"):
        read_words(b"\xff" * 10 + b"\n", "w", 1)  # refused for its size, not its encoding
    monkeypatch.setattr(words, "MAX_WORDS", 2)
    with pytest.raises(BundleError, match="3 words, over the limit of 2"):
        read_words(b"a\nb\nc\n", "w", 3)
