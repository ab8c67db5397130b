"""Pretrained word vectors starting a text network's embedding (`train --word-vectors`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from service.bundle.load import load_bundle
from service.cli import app
from service.errors import InvalidInputError
from service.training.text import fit_text
from service.training.text_data import training_words
from service.training.word_vectors import initialise, read_vectors
from tests.training.test_train_text import TOPICS, _csv, _texts

runner = CliRunner()


def _glove(path: Path, words: list[str], dim: int = 6, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    vecs = {w: rng.normal(size=dim).astype(np.float32) for w in words}
    path.write_text(
        "".join(w + " " + " ".join(repr(float(x)) for x in v) + "\n" for w, v in vecs.items())
    )
    return vecs


def test_only_the_wanted_words_are_read_and_kept_exactly(tmp_path: Path) -> None:
    vecs = _glove(tmp_path / "g.txt", ["heart", "brain", "liver", "unused", "Bowel"])
    wv = read_vectors(tmp_path / "g.txt", {"heart", "brain", "bowel"})
    assert wv.dim == 6 and set(wv.vectors) == {"heart", "brain"}  # "Bowel" is not "bowel"
    np.testing.assert_array_equal(wv.vectors["heart"], vecs["heart"])
    assert len(wv.sha256) == 64
    # Entries: whole words as they are, then lowercased; "##" continuations never.
    assert wv.lookup("Heart") is not None and wv.lookup("##heart") is None


def test_word2vec_header_is_skipped_and_words_may_hold_spaces(tmp_path: Path) -> None:
    path = tmp_path / "w2v.txt"
    path.write_text("3 3\nheart 1 2 3\nbrain 4 5 6\n. . . 7 8 9\n")  # glove.840B has ". . ."
    wv = read_vectors(path)
    assert wv.dim == 3 and wv.vectors["brain"].tolist() == [4.0, 5.0, 6.0]
    assert wv.vectors[". . ."].tolist() == [7.0, 8.0, 9.0]
    path.write_text("3 3\nheart 1 2 3\nbrain 4 5\n")
    with pytest.raises(InvalidInputError, match="line 3 has 2 numbers where line 2 had 3"):
        read_vectors(path)


@pytest.mark.parametrize(
    ("content", "said"),
    [
        (b"heart 1 2 3\nbrain 4 5\n", "line 2 has 2 numbers where line 1 had 3"),
        (b"heart 1 2 3\nbrain 4 5 6 7\n", "line 2 has more numbers where line 1 had 3"),
        (b"heart\t1\t2\n", "line 1 has a word and no numbers"),
        (b"heart 1 2 x\n", "line 1 holds a value that is not a number"),
        (b"heart 1 nan 3\n", "line 1 holds NaN or infinity"),
        (b"heart 1 2 3\n\xffbrain 1 2 3\n", "line 2 is not UTF-8"),
        (b"heart\n", "line 1 has a word and no numbers"),
        (b"\n\n", "holds no vectors"),
    ],
)
def test_a_bad_file_says_which_line_and_what(tmp_path: Path, content: bytes, said: str) -> None:
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(InvalidInputError, match=said):
        read_vectors(path)


def test_initialise_copies_covered_entries_and_keeps_padding_zero(tmp_path: Path) -> None:
    vecs = _glove(tmp_path / "g.txt", ["heart", "brain"], dim=4)
    wv = read_vectors(tmp_path / "g.txt")
    emb = nn.Embedding(5, 4, padding_idx=0)
    vocab = {"[PAD]": 0, "heart": 1, "##brain": 2, "Brain": 3, "lung": 4}
    torch.manual_seed(0)
    assert initialise(emb, vocab, wv, pad=0) == 2
    w = emb.weight.detach().numpy()
    np.testing.assert_array_equal(w[1], vecs["heart"])
    np.testing.assert_array_equal(w[3], vecs["brain"])  # lowercased to find it
    assert not np.allclose(w[2], vecs["brain"]) and (w[0] == 0).all()
    with pytest.raises(InvalidInputError, match="the vectors have 4 dimensions, the embedding 8"):
        initialise(nn.Embedding(5, 8), vocab, wv, pad=0)


def test_fit_text_starts_from_the_vectors(tmp_path: Path) -> None:
    texts, labels = _texts(60, 0)
    words = sorted(training_words(texts))
    vecs = _glove(tmp_path / "g.txt", words, dim=8)
    wv = read_vectors(tmp_path / "g.txt", set(words))
    y = np.array([sorted(TOPICS).index(v) for v in labels])
    # lr 0: Adam leaves the start untouched, so the trained embedding is the start.
    fit = fit_text(
        texts, y, 3, arch="fasttext", max_tokens=24, seed=0, max_epochs=1, lr=0.0,
        word_vectors=wv,
    )  # fmt: skip
    assert fit.config.embed == 8
    emb = fit.module.get_submodule("emb").weight.detach().numpy()
    vocab = fit.tokenizer.get_vocab()
    whole = [w for w in words if w in vocab]
    assert len(whole) >= 10
    for w in whole:
        np.testing.assert_array_equal(emb[vocab[w]], vecs[w])
    assert fit.word_vectors is not None
    assert fit.word_vectors["vocabulary_entries_initialised"] == f"{len(whole)} of {len(vocab)}"


def test_vectors_that_cover_no_entry_are_refused(tmp_path: Path) -> None:
    texts, labels = _texts(60, 0)
    _glove(tmp_path / "g.txt", ["herz", "gehirn", "leber"], dim=8)  # another language
    wv = read_vectors(tmp_path / "g.txt")
    y = np.array([sorted(TOPICS).index(v) for v in labels])
    with pytest.raises(InvalidInputError, match=r"none of the .* vocabulary entries is a word"):
        fit_text(texts, y, 3, arch="fasttext", max_tokens=24, seed=0, max_epochs=1,
                 word_vectors=wv)  # fmt: skip


def test_train_cli_records_the_vectors_and_refuses_a_network_without_embedding(
    tmp_path: Path,
) -> None:
    texts, labels = _texts(150, 0)
    data = _csv(tmp_path / "notes.csv", texts, labels)
    _glove(tmp_path / "g.txt", sorted(training_words(texts)), dim=8)
    args = ["train", "--data", str(data), "--target", "condition", "--task", "classification",
            "--out", str(tmp_path / "repo"), "--epochs", "4", "--max-tokens", "24",
            "--word-vectors", str(tmp_path / "g.txt"), "--text-column", "abstract"]  # fmt: skip
    res = runner.invoke(app, [*args, "--arch", "fasttext"])
    assert res.exit_code == 0, res.output
    m = load_bundle(Path(res.stdout.strip().splitlines()[-1])).manifest
    used = m.training.provenance["hyperparameters"]["word_vectors"]
    assert used["source"] == "g.txt" and used["dimensions"] == 8
    assert m.training.provenance["hyperparameters"]["embed"] == 8
    res = runner.invoke(app, [*args, "--arch", "tfidf"])
    assert res.exit_code == 2
    assert "the tfidf network has no word embedding" in res.output
    assert "Traceback" not in res.output
