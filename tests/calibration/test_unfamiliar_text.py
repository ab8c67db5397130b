"""The unfamiliar-text referral end to end: train (word list) -> calibrate (threshold) -> serve."""

from __future__ import annotations

import asyncio
from pathlib import Path

from service.bundle.load import load_bundle
from service.calibration.recalibration import UNFAMILIAR_RATE
from service.engine.familiar import for_bundle
from service.engine.referral import budget_threshold
from service.engine.text import encode_texts
from service.settings import Settings
from tests.training.test_train_text import _csv, _predict, _texts, _train

PROSE = "Bakeries open early on the harbour road, and the ferry waits for the bread."
MEDICAL = "The coronary artery and the heart."


def _coined(i: int, k: int) -> str:
    """A word no other row has (letters only: digits are not part of words)."""
    return "zq" + "".join(chr(97 + int(c)) for c in f"{i}{k}")


def test_a_text_of_other_words_is_referred_with_its_reason(tmp_path: Path) -> None:
    texts, labels = _texts(300, 5)
    # Calibration rows (every 5th) carry 0-3 words of their own, so their shares differ.
    cal_rows = list(range(0, 300, 5))
    for i in cal_rows:
        texts[i] += "".join(f" {_coined(i, k)}" for k in range((i // 5) % 4))
    splits = tmp_path / "splits.csv"
    part = ["calibration" if i % 5 == 0 else "test" if i % 5 == 1 else "train" for i in range(300)]
    splits.write_text("row,split\n" + "".join(f"{i},{p}\n" for i, p in enumerate(part)))
    repo = tmp_path / "repo"
    data = _csv(tmp_path / "notes.csv", texts, labels)
    bundle = load_bundle(_train(data, repo, "--splits", str(splits)))
    text = bundle.manifest.inputs.text
    assert text is not None and text.words is not None and text.words.min_texts == 2
    assert bundle.words is not None and "coronary" in bundle.words
    assert "bakeries" not in bundle.words and _coined(5, 0) not in bundle.words

    # Calibration set the threshold that refers UNFAMILIAR_RATE of its rows (ties aside).
    policy = bundle.manifest.referral
    assert policy is not None and policy.unfamiliar_words is not None
    f = for_bundle(bundle)
    assert f is not None
    cal = [texts[i] for i in cal_rows]
    shares = f.share(encode_texts(cal, bundle.tokenizer, text, max_instances=len(cal)).ids)
    assert len(set(shares.tolist())) == 4  # 0 to 3 coined words
    none = shares < 0
    assert policy.unfamiliar_words == budget_threshold(shares, none, UNFAMILIAR_RATE) > 0
    assert (shares > policy.unfamiliar_words).sum() <= round(UNFAMILIAR_RATE * len(cal))
    assert "unfamiliar words 0.0 %" in (policy.derived_from or "")

    body = asyncio.run(_predict(repo, "notes", [MEDICAL, PROSE]))
    medical, prose = (p["referral"] for p in body["predictions"])
    assert not any("unfamiliar" in r for r in medical["reasons"])
    assert prose["refer"] and prose["extrapolation"] and "extrapolation" in prose["triggers"]
    reason = next(r for r in prose["reasons"] if r.startswith("unfamiliar text: "))
    assert reason.endswith("it may not be the kind of text this model was trained on")
    assert "words of at least 2 training texts), above the threshold" in reason

    # The operator's switch turns it off, as for tabular extrapolation.
    off = Settings(model_dir=repo, referral={"notes": {"extrapolation": False}})
    body = asyncio.run(_predict(repo, "notes", [PROSE], settings=off))
    assert not any("unfamiliar" in r for r in body["predictions"][0]["referral"]["reasons"])
