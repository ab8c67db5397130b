"""A Hugging Face `tokenizers` tokenizer.json in a bundle, checked against an allow-list.

tokenizer.json is plain JSON read by the Rust library: no code runs (unlike `AutoTokenizer` with
`trust_remote_code`, pickles, or SentencePiece `.model` files parsed in C++). Two risks remain
and are closed here before the library sees the file: component types the service has not
reviewed, and custom regular expressions (`Split`/`Replace` with a `Regex` pattern), which can
backtrack for minutes on a crafted input. Only the listed types are accepted, regular
expressions never, and the vocabulary and merges are bounded.
"""

from __future__ import annotations

import json
from typing import Any

from service.errors import BundleError

# Component types by section; each was read in the tokenizers source (0.23) for what it does.
ALLOWED: dict[str, set[str]] = {
    "normalizer": {
        "BertNormalizer", "Lowercase", "NFC", "NFD", "NFKC", "NFKD", "StripAccents", "Strip",
        "Replace", "Prepend", "Sequence",
    },
    "pre_tokenizer": {
        "BertPreTokenizer", "Whitespace", "WhitespaceSplit", "Punctuation", "Digits",
        "ByteLevel", "Metaspace", "CharDelimiterSplit", "Split", "Sequence",
    },
    "model": {"WordPiece", "BPE", "WordLevel", "Unigram"},
    "post_processor": {
        "BertProcessing", "RobertaProcessing", "TemplateProcessing", "ByteLevel", "Sequence",
    },
    "decoder": {
        "WordPiece", "ByteLevel", "BPEDecoder", "Metaspace", "Strip", "Replace", "Fuse",
        "ByteFallback", "Sequence",
    },
}  # fmt: skip
_CHILDREN = ("normalizers", "pretokenizers", "processors", "decoders")
MAX_VOCABULARY = 1_000_000
MAX_MERGES = 1_000_000


def check_tokenizer_json(raw: bytes, where: str) -> dict[str, Any]:
    """Parse and check a tokenizer.json; returns the document or raises BundleError."""
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise BundleError(f"{where}: not valid JSON ({exc})") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("model"), dict):
        raise BundleError(f"{where}: a tokenizer.json object with a 'model' section is expected")
    for section, allowed in ALLOWED.items():
        part = doc.get(section)
        if part is not None:
            _component(part, section, allowed, where)
    model = doc["model"]
    vocab = model.get("vocab")
    if vocab is not None and len(vocab) > MAX_VOCABULARY:
        raise BundleError(f"{where}: {len(vocab)} vocabulary entries, over {MAX_VOCABULARY}")
    merges = model.get("merges")
    if merges is not None and len(merges) > MAX_MERGES:
        raise BundleError(f"{where}: {len(merges)} merges, over the limit of {MAX_MERGES}")
    return doc


def _component(part: Any, section: str, allowed: set[str], where: str, depth: int = 0) -> None:
    if not isinstance(part, dict) or depth > 4:
        raise BundleError(f"{where}: {section} must be an object (nested at most 4 deep)")
    kind = part.get("type")
    if kind not in allowed:
        raise BundleError(
            f"{where}: {section} type {str(kind)[:40]!r} is not allowed; allowed: {sorted(allowed)}"
        )
    own = {k: v for k, v in part.items() if k not in _CHILDREN}  # children say their own type
    if _has_regex(own):
        raise BundleError(
            f"{where}: {section} {kind} uses a custom regular expression, which can take "
            "unbounded time on a crafted input; use a plain String pattern or a built-in "
            "pre-tokenizer (Whitespace, BertPreTokenizer, ByteLevel)"
        )
    for key in _CHILDREN:
        for child in part.get(key) or []:
            _component(child, section, allowed, where, depth + 1)


def _has_regex(v: Any) -> bool:
    if isinstance(v, dict):
        return "Regex" in v or any(_has_regex(x) for x in v.values())
    if isinstance(v, list):
        return any(_has_regex(x) for x in v)
    return False


def load_tokenizer(raw: bytes, where: str) -> Any:
    """A `tokenizers.Tokenizer` from checked bytes (the library's own parser, JSON only)."""
    doc = check_tokenizer_json(raw, where)
    from tokenizers import Tokenizer  # a Rust extension: imported only for text models

    try:
        tok = Tokenizer.from_str(json.dumps(doc))
    except Exception as exc:  # the library raises its own exception type
        raise BundleError(f"{where}: the tokenizers library refuses it ({exc})") from exc
    tok.no_truncation()  # the service truncates itself, so that it can count and report
    tok.no_padding()
    return tok
