"""A Hugging Face `tokenizers` tokenizer.json in a bundle, checked against an allow-list.

tokenizer.json is plain JSON read by the Rust library: no code runs (unlike `AutoTokenizer` with
`trust_remote_code`, pickles, or SentencePiece `.model` files parsed in C++). Three risks
remain and are closed here before the library sees the file: component types the service has
not reviewed; custom regular expressions (`Split`/`Replace` with a `Regex` pattern), which can
backtrack for minutes on a crafted input; and settings that make one text cost without bound
(below). Only the listed types are accepted, regular expressions never, and the vocabulary,
merges, expansions and templates are bounded.
"""

from __future__ import annotations

import contextlib
import json
import weakref
from collections.abc import Iterator
from typing import Any

from service.errors import BundleError, McServeError

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
# Bounds on what a request's text can cost inside the library, where no limit of ours reaches:
# a reviewer's chain of 22 Replace "a" -> "aa" turned 100 bytes into a 1.6 GB allocation (the
# Rust library aborts the whole process when one fails), a template repeating $A 20,000 times
# did the same, and WordPiece with max_input_chars_per_word = 10**9 took hours on one 100 kB word.
MAX_CHILDREN = 16  # components in one Sequence
MAX_CONTENT = 64  # characters a Replace or Prepend inserts
MAX_GROWTH = 4.0  # how many times longer a text may come out of the normalizers
MAX_WORD_CHARS = 200  # WordPiece's max_input_chars_per_word (100 by default; cubic past it)
MAX_PIECE_CHARS = 256  # characters in one Unigram piece (one of 20,000 characters made one
# 100 kB word take 27 s; WordPiece pieces are bounded by MAX_WORD_CHARS, BPE's cost is not)
MAX_TEMPLATE = 16  # entries of a TemplateProcessing template
MAX_SPECIAL_IDS = 16  # ids one special token of a template stands for


def check_tokenizer_json(raw: bytes, where: str) -> dict[str, Any]:
    """Parse and check a tokenizer.json; returns the document or raises BundleError."""
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, huge numbers
        raise BundleError(f"{where}: not valid JSON ({exc})") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("model"), dict):
        raise BundleError(f"{where}: a tokenizer.json object with a 'model' section is expected")
    for section, allowed in ALLOWED.items():
        part = doc.get(section)
        if part is not None:
            _component(part, section, allowed, where)
            if len(_flat(part)) > MAX_CHILDREN:  # nested Sequences included: each step costs
                raise BundleError(
                    f"{where}: {section} has more than {MAX_CHILDREN} components in all"
                )
    for section in ("normalizer", "decoder"):  # decoders run too: the word check decodes ids
        if _growth(doc.get(section)) > MAX_GROWTH:
            raise BundleError(
                f"{where}: its {section}s can make a text more than {MAX_GROWTH:g} times longer "
                "(Replace or Prepend content longer than what it replaces, or Unicode "
                "normalization of inserted non-ASCII text, compounded); a tokenizer "
                "normalizes, it does not expand"
            )
    _check_processor(doc.get("post_processor"), where)
    model = doc["model"]
    chars = model.get("max_input_chars_per_word")
    if chars is not None and not (isinstance(chars, int) and 0 < chars <= MAX_WORD_CHARS):
        raise BundleError(
            f"{where}: model max_input_chars_per_word {str(chars)[:20]} is outside 1.."
            f"{MAX_WORD_CHARS} (WordPiece's time grows with a word's length cubed past it)"
        )
    if model.get("dropout") not in (None, 0, 0.0):  # BPE dropout: a random tokenization
        raise BundleError(
            f"{where}: model dropout {str(model.get('dropout'))[:20]} tokenizes at random; "
            "seeded answers must be repeatable (set it to null for serving)"
        )
    vocab, merges = model.get("vocab"), model.get("merges")
    # Checked here, not by len() below: a number there was a bare TypeError, not a refusal.
    for key, value, kinds in (("vocab", vocab, (dict, list)), ("merges", merges, (list,))):
        if value is not None and not isinstance(value, kinds):
            want = " or ".join({dict: "an object", list: "a list"}[k] for k in kinds)
            raise BundleError(
                f"{where}: model.{key} must be {want}, got {type(value).__name__}; write the "
                "tokenizer with the tokenizers library (tokenizer.save)"
            )
    if model.get("type") == "Unigram" and not all(isinstance(e, list) and e for e in vocab or []):
        raise BundleError(f"{where}: a Unigram model.vocab lists [piece, score] pairs")
    if vocab is not None and len(vocab) > MAX_VOCABULARY:
        raise BundleError(f"{where}: {len(vocab)} vocabulary entries, over {MAX_VOCABULARY}")
    if model.get("type") == "Unigram":  # its lattice holds every piece that fits a word
        longest = max((len(str(e[0])) for e in vocab or [] if e), default=0)
        if longest > MAX_PIECE_CHARS:
            raise BundleError(
                f"{where}: a Unigram piece of {longest} characters, over {MAX_PIECE_CHARS}"
            )
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
    if section == "decoder" and kind == "Strip" and own.get("stop", 0) != 0:
        # It slices each token by both counts and panics when they overlap (reviewer BL: every
        # text with the word "a" killed the compute process); Llama's Strip(" ", 1, 0) is fine.
        raise BundleError(
            f"{where}: decoder Strip with stop {str(own['stop'])[:20]} can panic on a short "
            "token; only stop 0 is accepted (strip from the start only)"
        )
    for key in ("content", "prepend"):
        if len(str(own.get(key, ""))) > MAX_CONTENT:
            raise BundleError(
                f"{where}: {section} {kind} inserts {len(str(own[key]))} characters, over "
                f"{MAX_CONTENT}"
            )
    for key in _CHILDREN:
        children = part.get(key) or []
        if not isinstance(children, list) or len(children) > MAX_CHILDREN:
            raise BundleError(
                f"{where}: {section} {kind} must list at most {MAX_CHILDREN} components"
            )
        for child in children:
            _component(child, section, allowed, where, depth + 1)


# How many characters a Unicode normalizer can make of one (NFKD: U+FDFA is 18), counted only
# after a Replace or Prepend has inserted non-ASCII text: a text's own characters expand once,
# but a reviewer's Replace "a" -> U+FDFA then NFKD, six times over, made 664,030 characters of 10.
_UNICODE_GROWTH = {
    "NFKD": 18.0, "NFKC": 18.0, "NFD": 4.0, "NFC": 4.0, "BertNormalizer": 4.0, "Lowercase": 3.0,
}  # fmt: skip


def _flat(part: Any) -> list[dict[str, Any]]:
    """A section's components in the order they run (a Sequence's children in place)."""
    if not isinstance(part, dict):
        return []
    if part.get("type") == "Sequence":
        children = [c for key in _CHILDREN for c in part.get(key) or []]
        return [c for child in children for c in _flat(child)]
    return [part]


def _growth(part: Any) -> float:
    """How many times longer a normalizer or decoder chain can make a text at most."""
    out, inserted = 1.0, False
    for step in _flat(part):
        kind = step.get("type")
        content = str(step.get("content", step.get("prepend", "")))
        if kind == "Replace":
            pattern = step.get("pattern")
            text = str(pattern.get("String", "")) if isinstance(pattern, dict) else ""
            # An empty pattern matches between every two characters.
            out *= float(len(content) + 1) if not text else max(1.0, len(content) / len(text))
        elif kind == "Prepend":  # once per piece between added tokens: one character, at worst
            out *= float(len(content) + 1)
        elif kind in _UNICODE_GROWTH and inserted:
            out *= _UNICODE_GROWTH[kind]
        inserted = inserted or (kind in ("Replace", "Prepend") and not content.isascii())
    return out


def _check_processor(part: Any, where: str) -> None:
    """A template's size, and what its special tokens stand for, bounded (Sequence included)."""
    if not isinstance(part, dict):
        return
    for child in part.get("processors") or []:
        _check_processor(child, where)
    if part.get("type") != "TemplateProcessing":
        return
    for key in ("single", "pair"):
        template = part.get(key) or []
        if not isinstance(template, list) or len(template) > MAX_TEMPLATE:
            raise BundleError(
                f"{where}: post_processor template '{key}' must have at most {MAX_TEMPLATE} entries"
            )
    specials = part.get("special_tokens") or {}
    named = {
        item["SpecialToken"].get("id")
        for key in ("single", "pair")
        for item in part.get(key) or []
        if isinstance(item, dict) and isinstance(item.get("SpecialToken"), dict)
    }
    for name in sorted(map(str, named - set(specials if isinstance(specials, dict) else ()))):
        # The library panics on its first text (not an Exception: it passed every handler)
        raise BundleError(
            f"{where}: post_processor template names special token {name[:40]!r}, which its "
            "special_tokens do not declare; declare it with its ids"
        )
    for name, token in specials.items() if isinstance(specials, dict) else []:
        ids = token.get("ids") if isinstance(token, dict) else None
        if not isinstance(ids, list) or len(ids) > MAX_SPECIAL_IDS:
            raise BundleError(
                f"{where}: post_processor special token {str(name)[:40]!r} must stand for at "
                f"most {MAX_SPECIAL_IDS} ids"
            )


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
    # A client's "[PAD]" or "[CLS]" is text, not the special token: as one, "[PAD]" became the
    # padding id (the model masked it) and "[SEP]" ended a text inside it.
    tok.encode_special_tokens = True
    tok.no_padding()
    fix = (
        "a tokenizer must encode any text and decode each of its ids (an unknown word needs "
        "the model's unk_token in its vocabulary): fix tokenizer.json"
    )
    with library_errors(BundleError, f"{where}: the tokenizer fails on a probe", fix):
        _probe(tok)
    return tok


def _probe(tok: Any) -> None:
    """What the service asks of every tokenizer, once at load: encode (an empty text, a short
    one, with special tokens) and decode each id alone. A panic here refuses the bundle; the
    allow-list should leave none, and this catches what it missed."""
    for text in ("", "probe a text, 12 words: of Ab and b."):
        tok.encode(text, add_special_tokens=True)
    ids = sorted(set(tok.get_vocab(with_added_tokens=True).values()))
    tok.decode_batch([[i] for i in ids], skip_special_tokens=True)
    tok.decode_batch([ids[:4096]], skip_special_tokens=False)


@contextlib.contextmanager
def library_errors(kind: type[McServeError], what: str, fix: str = "") -> Iterator[None]:
    """Errors of the tokenizers library as `kind` (`what`: the message's start, `fix` its end).
    A Rust panic arrives as pyo3's PanicException, a BaseException: it passed every `except
    Exception`, stopping start-up, the poll loop or the compute process."""
    end = f"; {fix}" if fix else ""
    try:
        yield
    except Exception as exc:
        raise kind(f"{what} ({type(exc).__name__}: {str(exc)[:200]}){end}") from exc
    except BaseException as exc:
        if type(exc).__name__ != "PanicException":
            raise  # KeyboardInterrupt, SystemExit, cancellation: not the library's
        raise kind(f"{what} (the library panicked: {str(exc)[:200]}){end}") from exc


# Per tokenizer object: a Unigram model's id is in its JSON, too slow to read per request.
_UNKNOWN_IDS: weakref.WeakKeyDictionary[Any, int | None] = weakref.WeakKeyDictionary()


def unknown_token_id(tok: Any) -> int | None:
    """The id of the tokenizer's unknown token, or None where its model has none: WordPiece,
    BPE and WordLevel name an `unk_token`; a Unigram model keeps an `unk_id` in its JSON."""
    try:
        return _UNKNOWN_IDS[tok]
    except (KeyError, TypeError):  # TypeError: an object weakref cannot hold (a test double)
        pass
    model = getattr(tok, "model", None)
    token = getattr(model, "unk_token", None)
    found: int | None = tok.token_to_id(token) if isinstance(token, str) else None
    if found is None and type(model).__name__ == "Unigram":
        unk = json.loads(tok.to_str())["model"].get("unk_id")
        found = None if unk is None else int(unk)
    with contextlib.suppress(TypeError):
        _UNKNOWN_IDS[tok] = found
    return found


def largest_id(tok: Any) -> int:
    """The largest id `tok` can put in a text's ids: its vocabulary's with added tokens (ids
    need not be dense: a vocabulary of 4,000 entries may map one to 4,500) and the special ids
    a post-processor inserts."""
    ids = list(tok.get_vocab(with_added_tokens=True).values())
    stack = [json.loads(tok.to_str()).get("post_processor")]
    while stack:
        part = stack.pop()
        if not isinstance(part, dict):
            continue
        stack.extend(part.get("processors") or [])
        for key in ("sep", "cls"):  # BertProcessing, RobertaProcessing: [token, id]
            pair = part.get(key)
            if isinstance(pair, list) and len(pair) == 2 and isinstance(pair[1], int):
                ids.append(pair[1])
        specials = part.get("special_tokens")
        for token in specials.values() if isinstance(specials, dict) else []:
            ids.extend(i for i in (token.get("ids") or []) if isinstance(i, int))
    return max(ids, default=-1)
