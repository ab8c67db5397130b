"""The served medical-abstracts model refers non-medical text for its unfamiliar words."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from bench.ood_text import prose
from models import medical_abstracts as recipe
from service.bundle import load_bundle
from service.calibration.recalibration import UNFAMILIAR_RATE
from service.engine.familiar import WordReader, for_bundle
from service.engine.text import encode_texts

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models" / recipe.NAME


def test_version_8_is_version_6_with_a_word_list() -> None:
    v6, v8 = load_bundle(MODELS / "6"), load_bundle(MODELS / "8")
    words = {k: a for k, a in v8.manifest.artifacts.items() if a.role == "words"}
    assert list(words) == ["words.txt"]
    assert {k: a for k, a in v8.manifest.artifacts.items() if k not in words} == dict(
        v6.manifest.artifacts
    )  # the same network, bit for bit
    assert v8.manifest.training.row_fingerprints == v6.manifest.training.row_fingerprints


def test_the_served_model_refers_prose_and_few_abstracts() -> None:
    served = load_bundle(MODELS / recipe.SERVED)
    spec, policy, f = served.manifest.inputs.text, served.manifest.referral, for_bundle(served)
    assert spec is not None and policy is not None and f is not None
    threshold = policy.unfamiliar_words
    assert threshold is not None

    def share(texts: list[str]) -> np.ndarray:
        return f.share(encode_texts(texts, served.tokenizer, spec, len(texts)).ids)

    with (ROOT / "models" / "data" / f"{recipe.NAME}-test.csv").open(newline="") as fh:
        abstracts = [row["text"] for row in csv.DictReader(fh)]
    n = len(abstracts)
    # The threshold refers UNFAMILIAR_RATE of the 572 calibration texts; on the test texts the
    # rate is that within 3 standard errors (test sampling and calibration sampling together).
    se = math.sqrt(2 * UNFAMILIAR_RATE * (1 - UNFAMILIAR_RATE) / n)
    assert np.mean(share(abstracts) > threshold) <= UNFAMILIAR_RATE + 3 * se
    # Non-medical prose (bench/data/plain_prose.txt, 45 paragraphs): 95.6 % measured. Read as a
    # sample of non-medical prose, a detection rate at least that less 3 binomial standard errors
    # (86 %) is what this check promises; fewer means the word list or threshold broke.
    paragraphs = prose()
    assert len(paragraphs) == 45
    assert np.mean(share(paragraphs) > threshold) >= 0.956 - 3 * math.sqrt(0.956 * 0.044 / 45)


def test_the_served_tokenizer_reads_the_same_words_either_way() -> None:
    """The table that reads words per served text equals WordPiece decoding, on every abstract
    of the data set's test file and the prose (3,000-odd texts, a second)."""

    served = load_bundle(MODELS / recipe.SERVED)
    fast, slow = WordReader(served.tokenizer), WordReader.by_decoder(served.tokenizer)
    texts = recipe.load_data().texts + prose()
    rows = [e.ids for e in served.tokenizer.encode_batch(texts, add_special_tokens=False)]
    assert fast.table is not None and fast(rows) == slow(rows)
