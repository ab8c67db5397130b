"""The unfamiliar-text referral end to end: train (word list) -> calibrate (threshold) -> serve."""

from __future__ import annotations

import asyncio
import csv
import json
from pathlib import Path

import pytest

from service.bundle.load import load_bundle
from service.bundle.manifest import Manifest
from service.calibration.recalibration import UNFAMILIAR_RATE, calibrate_bundle
from service.engine.familiar import for_bundle
from service.engine.model import ServedModel
from service.engine.text import encode_texts
from service.settings import Settings
from tests.training.test_train_text import _csv, _predict, _texts, _train

PROSE = "Bakeries open early on the harbour road, and the ferry waits for the bread."
MEDICAL = "The coronary artery and the heart."
N = 500  # every 5th row a calibration row: 100 of them
MODELS = Path(__file__).resolve().parents[2] / "models"


def _coined(i: int, k: int) -> str:
    """A word no other row has (letters only: digits are not part of words)."""
    return "zq" + "".join(chr(97 + int(c)) for c in f"{i}{k}")


def _words_added(k: int) -> int:
    """Coined words on the k-th calibration row: 0-8 in tens, and two rows above the rest, so
    that the share 1 % of them exceed is not a tie."""
    return {99: 12, 98: 10}.get(k, k // 12)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    tmp = tmp_path_factory.mktemp("unfamiliar")
    texts, labels = _texts(N, 5)
    cal_rows = list(range(0, N, 5))
    for k, i in enumerate(cal_rows):
        texts[i] = "".join(f"{_coined(i, j)} " for j in range(_words_added(k))) + texts[i]
    splits = tmp / "splits.csv"
    part = ["calibration" if i % 5 == 0 else "test" if i % 5 == 1 else "train" for i in range(N)]
    splits.write_text("row,split\n" + "".join(f"{i},{p}\n" for i, p in enumerate(part)))
    repo = tmp / "repo"
    data = _csv(tmp / "notes.csv", texts, labels)
    _train(data, repo, "--splits", str(splits), "--max-tokens", "64")  # every word read
    return repo, [texts[i] for i in cal_rows]


def test_calibration_refers_its_share_and_serving_refers_other_words(
    trained: tuple[Path, list[str]],
) -> None:
    repo, cal = trained
    bundle = load_bundle(repo / "notes" / "2")
    text = bundle.manifest.inputs.text
    assert text is not None and text.words is not None and text.words.min_texts == 2
    assert bundle.words is not None and "coronary" in bundle.words
    assert "bakeries" not in bundle.words and _coined(5, 0) not in bundle.words
    # The threshold refers UNFAMILIAR_RATE of the 100 calibration rows: exactly one.
    policy = bundle.manifest.referral
    assert policy is not None and policy.unfamiliar_words is not None
    f = for_bundle(bundle)
    assert f is not None
    shares = f.share(encode_texts(cal, bundle.tokenizer, text, max_instances=len(cal)).ids)
    assert (shares > policy.unfamiliar_words).sum() == round(UNFAMILIAR_RATE * len(cal)) == 1
    assert "unfamiliar words 1.0 %" in (policy.derived_from or "")

    body = asyncio.run(_predict(repo, "notes", [MEDICAL, PROSE]))
    medical, prose = (p["referral"] for p in body["predictions"])
    assert not any("unfamiliar" in r for r in medical["reasons"])
    assert prose["refer"] and prose["extrapolation"] and "extrapolation" in prose["triggers"]
    reason = next(r for r in prose["reasons"] if r.startswith("unfamiliar text: "))
    assert reason.endswith("it may not be the kind of text this model was trained on")
    assert "words of at least 2 training texts), above the threshold" in reason


@pytest.mark.parametrize(
    ("override", "referred"),
    [({"extrapolation": False}, False), ({"unfamiliar_words": None}, False),
     ({"unfamiliar_words": 0.95}, False), ({"unfamiliar_words": 0.5}, True)],
)  # fmt: skip
def test_the_operator_moves_or_turns_off_the_check(
    trained: tuple[Path, list[str]], override: dict[str, object], referred: bool
) -> None:
    repo, _ = trained  # most of PROSE's words, but not all, are unfamiliar: between 50 and 95 %
    settings = Settings(model_dir=repo, referral={"notes": override})
    body = asyncio.run(_predict(repo, "notes", [PROSE], settings=settings))
    referral = body["predictions"][0]["referral"]
    assert any(r.startswith("unfamiliar text: ") for r in referral["reasons"]) == referred
    # The flag still says so when the trigger is off (as for a tabular feature out of range).
    assert referral["extrapolation"] == (referred or override == {"extrapolation": False})


def test_a_threshold_that_can_never_fire_is_a_warning(
    trained: tuple[Path, list[str]], tmp_path: Path
) -> None:
    repo, cal = trained
    rows = [(t, "cardio") for t in cal[:60]] + [("12 345 6.7", "cardio")] * 3  # no words: 5 %
    data = tmp_path / "cal.csv"
    with data.open("w", newline="") as fh:
        csv.writer(fh).writerows([("abstract", "condition"), *rows])
    res = calibrate_bundle(repo / "notes" / "1", data, repo, version="w", target="condition")
    assert res.manifest.referral is not None and res.manifest.referral.unfamiliar_words == 1.0
    assert any("will never refer a text" in w for w in res.warnings)


def test_unfamiliar_words_without_a_word_list(caplog: pytest.LogCaptureFixture) -> None:
    """In a manifest: refused. As an operator's setting (by model name, so it also reaches the
    versions before the word list): ignored there, with a warning; the version still serves."""
    tabular = load_bundle(MODELS / "breast-cancer" / "2")
    served = ServedModel(tabular, referral_overrides={"breast-cancer": {"unfamiliar_words": 0.1}})
    assert served.calibrator.policy.unfamiliar_words is None
    assert "unfamiliar_words is ignored: this version has no word list" in caplog.text
    doc = json.loads((MODELS / "breast-cancer" / "2" / "manifest.json").read_text())
    doc["referral"]["unfamiliar_words"] = 0.1
    with pytest.raises(ValueError, match=r"referral.unfamiliar_words needs a text model"):
        Manifest.model_validate(doc)


def test_no_word_list_when_asked(trained: tuple[Path, list[str]], tmp_path: Path) -> None:
    texts, labels = _texts(60, 6)
    path = _train(_csv(tmp_path / "n.csv", texts, labels), tmp_path / "r", "--word-min-texts", "0")
    m = load_bundle(path).manifest
    assert m.inputs.text is not None and m.inputs.text.words is None
    assert m.referral is not None and m.referral.unfamiliar_words is None
    assert "words.txt" not in m.artifacts


def test_settings_for_the_other_task_are_ignored_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A regressor has no prediction set, a classifier no aleatoric std: an operator's setting
    of those was silently ignored."""
    regressor = ServedModel(
        load_bundle(MODELS / "diabetes" / "2"),
        referral_overrides={"diabetes": {"max_set_size": 2, "epistemic": 30.0}},
    )
    assert regressor.calibrator.policy.max_set_size is None
    assert regressor.calibrator.policy.epistemic == 30.0
    assert "diabetes 2: the referral setting max_set_size is ignored: it is for classifiers" in (
        caplog.text
    )
    classifier = ServedModel(
        load_bundle(MODELS / "breast-cancer" / "2"),
        referral_overrides={"breast-cancer": {"relative_width": 0.5}},
    )
    assert classifier.calibrator.policy.relative_width is None
    assert "the referral setting relative_width is ignored: it is for regressors" in caplog.text
