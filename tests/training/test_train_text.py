"""`python -m service train` on texts: CSV of texts -> tokenizer, network, bundle, calibration."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from service.api.app import create_app
from service.bundle.load import load_bundle
from service.cli import app
from service.settings import Settings
from service.training.text_data import detect_text_column, read_splits, train_tokenizer

runner = CliRunner()
TOPICS = {
    "cardio": ["heart", "artery", "coronary", "infarction", "atrial"],
    "neuro": ["brain", "seizure", "neuron", "cortex", "stroke"],
    "gastro": ["liver", "bowel", "gastric", "colon", "hepatic"],
}
FILLER = ["the", "patients", "study", "with", "were", "and", "results", "of", "in", "we"]


def _texts(n: int, seed: int) -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(seed)
    names = sorted(TOPICS)
    texts, labels = [], []
    for i in range(n):
        label = names[i % 3]
        words = list(rng.choice(FILLER, 12)) + list(rng.choice(TOPICS[label], 4))
        rng.shuffle(words)
        texts.append(" ".join(words).capitalize() + ", as reported.")
        labels.append(label)
    return texts, labels


def _csv(path: Path, texts: list[str], labels: list[str], extra: bool = True) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "abstract", "condition"] if extra else ["abstract", "condition"])
        for i, (t, y) in enumerate(zip(texts, labels, strict=True)):
            w.writerow([i, t, y] if extra else [t, y])
    return path


def _train(data: Path, out: Path, *extra: str) -> Path:
    args = ["train", "--data", str(data), "--target", "condition", "--task", "classification"]
    res = runner.invoke(
        app, [*args, "--out", str(out), "--epochs", "8", "--seed", "1", "--max-tokens", "24",
              "--text-column", "abstract", *extra],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    return Path(res.stdout.strip().splitlines()[-1])


async def _predict(
    repo: Path, name: str, texts: list[str], settings: Settings | None = None
) -> dict[str, Any]:
    application = create_app(settings or Settings(model_dir=repo))
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            r = await client.post(
                f"/v1/models/{name}:predict", json={"instances": texts, "parameters": {"seed": 1}}
            )
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def test_text_csv_trains_a_calibrated_bundle_that_serves(tmp_path: Path) -> None:
    texts, labels = _texts(150, 0)
    data = _csv(tmp_path / "notes.csv", texts, labels)
    bundle = _train(data, tmp_path / "repo", "--calibration-method", "vector")
    assert bundle == tmp_path / "repo" / "notes" / "2"
    m = load_bundle(bundle).manifest
    assert m.inputs.text is not None and m.inputs.text.max_tokens == 24
    assert m.outputs.labels == ["cardio", "gastro", "neuro"]
    assert m.calibration is not None and m.calibration.n == 30  # the 80/20 cut of 150 rows
    assert m.calibration.temperature is not None and m.referral is not None
    # --calibration-method reaches the calibrate step: vector scaling, one scale per class.
    assert m.calibration.class_scale is not None and len(m.calibration.class_scale) == 3
    assert m.calibration.fit["requested"] == "vector"
    assert m.training.provenance["tokenizer"]["fitted_on"] == "training rows only"
    # Separable topics: the held-out MC accuracy is far above chance (1/3) even after 8 epochs.
    assert m.training.metrics["calibration_accuracy"] >= 0.8
    body = await _predict(tmp_path / "repo", "notes", ["The coronary artery and the heart."])
    assert body["model"]["version"] == "2"
    pred = body["predictions"][0]
    assert set(pred["probabilities"]) == {"cardio", "gastro", "neuro"}
    assert pred["label"] == "cardio"
    assert isinstance(pred["referral"]["refer"], bool) and pred["prediction_set"]["level"] == 0.95
    # Its training CSV (id, abstract, condition) is evaluated as it is, without --target: the
    # provenance names the columns `train` read.
    assert m.training.provenance["target_column"] == "condition"
    ev = ["evaluate", str(bundle), "--data", str(data), "--out", str(tmp_path / "report")]
    res = runner.invoke(app, [*ev, "--samples", "8"])
    assert res.exit_code == 0, res.output


def test_the_tokenizer_sees_training_rows_only(tmp_path: Path) -> None:
    """A word that occurs only in calibration and test rows must not enter the vocabulary."""
    texts, labels = _texts(60, 2)
    marked = {i for i in range(60) if i % 5 == 0}  # rows 0, 5, ...: calibration or test
    texts = [t + (" zygomorphic" * 30 if i in marked else "") for i, t in enumerate(texts)]
    data = _csv(tmp_path / "leak.csv", texts, labels)
    splits = tmp_path / "splits.csv"
    part = ["calibration" if i % 10 == 0 else "test" if i % 5 == 0 else "train" for i in range(60)]
    splits.write_text("row,split\n" + "".join(f"{i},{p}\n" for i, p in enumerate(part)))
    bundle = _train(data, tmp_path / "repo", "--splits", str(splits))
    m = load_bundle(bundle).manifest
    assert m.calibration is not None and m.calibration.n == 6
    assert len(m.training.row_fingerprints["test"]) == 6
    vocab = json.loads((bundle / m.inputs.text.tokenizer).read_text())["model"]["vocab"]  # type: ignore[union-attr]
    assert "zygomorphic" not in vocab and "##morphic" not in vocab
    # The same fitting on all rows does learn it: the check above can fail.
    assert "zygomorphic" in train_tokenizer(texts, 300).get_vocab()


def test_calibrate_and_evaluate_read_the_column_train_read() -> None:
    """A model trained on `title` was evaluated on a `text` column beside it (review R9): the
    recorded column comes first, then `text`, then the one other column."""
    from service.calibration.labelled import value_column

    def _text_column(header: list[str], target: str, where: Path, recorded: object) -> str:
        return value_column(header, target, where, "text", "a text model's CSV", recorded)

    where = Path("t.csv")
    assert _text_column(["title", "text", "label"], "label", where, "title") == "title"
    assert _text_column(["text", "label"], "label", where, "abstract") == "text"
    assert _text_column(["body", "label"], "label", where, None) == "body"


def test_text_column_is_detected_and_splits_are_checked(tmp_path: Path) -> None:
    texts, labels = _texts(20, 3)
    data = _csv(tmp_path / "d.csv", texts, labels)
    assert detect_text_column(data, "condition") == "abstract"
    bad = tmp_path / "s.csv"
    bad.write_text("row,split\n" + "".join(f"{i},train\n" for i in range(19)))
    with pytest.raises(Exception, match="1 data rows have no split"):
        read_splits(bad, 20)
    res = runner.invoke(
        app,
        ["train", "--data", str(data), "--target", "condition", "--task", "classification",
         "--out", str(tmp_path / "r"), "--text-column", "abstract", "--arch", "rnn"],
    )  # fmt: skip
    assert (
        res.exit_code == 2
        and "--arch 'rnn': use one of textcnn, bilstm, transformer, fasttext, tfidf" in (res.output)
    )


@pytest.mark.parametrize("arch", ["bilstm", "transformer", "fasttext", "tfidf"])
def test_other_architectures_train_and_bundle(tmp_path: Path, arch: str) -> None:
    texts, labels = _texts(60, 4)
    data = _csv(tmp_path / "a.csv", texts, labels)
    res = runner.invoke(
        app,
        ["train", "--data", str(data), "--target", "condition", "--task", "classification",
         "--out", str(tmp_path / "r"), "--epochs", "2", "--max-tokens", "16", "--arch", arch,
         "--text-column", "abstract"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    m = load_bundle(Path(res.stdout.strip().splitlines()[-1])).manifest
    assert m.training.provenance["hyperparameters"]["arch"] == arch
    assert m.inputs.text is not None and m.calibration is not None
