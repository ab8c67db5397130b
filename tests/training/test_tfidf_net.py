"""The `tfidf` text network computes scikit-learn's TF-IDF vector from token ids in its graph
(unigrams and hashed bigrams, sublinear tf, smooth idf over the training rows, min_df 2, L2
norm), so with dropout off it is a logistic regression on exactly that vector."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.feature_extraction.text import TfidfVectorizer

from service.training.text_nets import BIGRAM_BUCKETS, TextNetConfig, build, document_idf

VOCAB, PAD = 30, 0


def _rows(n: int, length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 8, (n, length), generator=g)  # few distinct ids: repeats and bigrams
    for i in range(n):
        ids[i, length - i % 4 :] = PAD  # trailing padding of several lengths
    return ids


def _terms(row: torch.Tensor) -> list[str]:
    t = [int(v) for v in row if int(v) != PAD]
    bigrams = [((a * VOCAB + b) % BIGRAM_BUCKETS) + VOCAB for a, b in itertools.pairwise(t)]
    return [str(v) for v in t + bigrams]


def test_idf_is_sklearns_with_min_df() -> None:
    ids = _rows(12, 10, 0)
    vec = TfidfVectorizer(analyzer=_terms, sublinear_tf=True, min_df=2).fit(list(ids))
    idf = document_idf(ids, VOCAB)
    kept = {int(k): vec.idf_[j] for k, j in vec.vocabulary_.items()}
    assert np.allclose([idf[k].item() for k in kept], list(kept.values()), atol=1e-6)
    rare = [k for k in range(VOCAB + BIGRAM_BUCKETS) if k not in kept]
    assert float(idf[rare].abs().max()) == 0.0  # in fewer than 2 rows (or never): dropped


def test_logits_are_a_linear_function_of_sklearns_tfidf_vector() -> None:
    train, test = _rows(12, 10, 0), _rows(5, 10, 1)
    vec = TfidfVectorizer(analyzer=_terms, sublinear_tf=True, min_df=2).fit(list(train))
    x = vec.transform(list(test)).toarray()  # [5, features], rows L2-normalised
    torch.manual_seed(0)
    net = build(TextNetConfig("tfidf", VOCAB, 10, 3, dropout=0.5), train).eval()
    with torch.no_grad():
        net.unigram.weight.normal_()
        net.bigram.weight.normal_()
        net.out.bias.copy_(torch.tensor([0.5, -1.0, 2.0]))
        got = net(test).numpy()
    order = sorted(vec.vocabulary_, key=vec.vocabulary_.get)
    table = torch.cat([net.unigram.weight, net.bigram.weight]).detach().numpy()
    w = table[[int(k) for k in order]]  # [features, 3]
    assert np.allclose(got, x @ w + [0.5, -1.0, 2.0], atol=1e-5)


def test_padding_does_not_change_the_answer() -> None:
    train = _rows(12, 10, 0)
    torch.manual_seed(0)
    net = build(TextNetConfig("tfidf", VOCAB, 16, 3), train).eval()
    with torch.no_grad():
        net.unigram.weight.normal_()
        net.bigram.weight.normal_()
        short = torch.tensor([[3, 4, 3, 4, 5, 0, 0, 0]])
        long = torch.cat([short, torch.zeros(1, 8, dtype=torch.int64)], 1)
        assert torch.allclose(net(short), net(long), atol=1e-6)


def test_a_tfidf_bundle_loads_and_its_onnx_graph_agrees(tmp_path: Path) -> None:
    """Counting uses new_zeros / scatter_add / gather: the bundle format must rebuild them and
    the ONNX export (the deterministic path) must compute the same."""
    from service.bundle.load import load_bundle
    from service.engine.model import ServedModel
    from service.packaging import save
    from service.training.text_data import train_tokenizer

    texts = ["the heart artery failed", "brain seizure in the cortex", "liver and bowel"] * 4
    tok = train_tokenizer(texts, 300)
    v = tok.get_vocab_size()
    ids = torch.randint(1, v, (6, 12), generator=torch.Generator().manual_seed(2))
    ids[0, 6:] = PAD
    torch.manual_seed(0)
    net = build(TextNetConfig("tfidf", v, 12, 3), ids).eval()
    with torch.no_grad():
        net.unigram.weight.normal_()
        net.bigram.weight.normal_()
        full = net(ids)
    net.compact()  # as fit_text leaves it: only the buckets with an idf
    with torch.no_grad():
        assert torch.equal(net(ids), full)  # the same numbers, bit for bit
    assert net.bigram.num_embeddings < 100  # not 262,139
    path = save(
        net, ids[:4], out_dir=tmp_path, name="tfidf", version="1", task="classification",
        intended_use="test", labels=["a", "b", "c"], tokenizer=tok,
    )  # fmt: skip
    served = ServedModel(load_bundle(path), device="cpu")
    with torch.no_grad():
        expected = torch.softmax(net(ids), -1).numpy()
    got = served.deterministic(ids.numpy()).point  # ONNX Runtime
    assert served.onnx is not None and np.allclose(got, expected, atol=1e-5)


def test_padding_made_bigrams_never_count_for_a_real_one() -> None:
    """With a vocabulary larger than the bucket count, the real bigram (5, BIGRAM_BUCKETS)
    hashes where (5, pad) does; a padded copy of the text must still count it once."""
    vocab = 300_000
    text = [5, BIGRAM_BUCKETS, 7, 5]
    assert (5 * vocab + BIGRAM_BUCKETS) % BIGRAM_BUCKETS == (5 * vocab + PAD) % BIGRAM_BUCKETS
    train = torch.tensor([text, text, [7, 5, 7, 9]])
    torch.manual_seed(0)
    net = build(TextNetConfig("tfidf", vocab, 6, 2), train).eval()
    with torch.no_grad():
        net.unigram.weight.normal_()
        net.bigram.weight.normal_()
        bare = net(torch.tensor([text]))
        padded = net(torch.tensor([[*text, PAD, PAD]]))
    assert torch.allclose(bare, padded, atol=1e-6)


def test_a_tfidf_network_needs_two_tokens() -> None:
    with pytest.raises(ValueError, match="max_tokens must be >= 2"):
        build(TextNetConfig("tfidf", VOCAB, 1, 3), _rows(4, 1, 0))
