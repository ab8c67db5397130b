"""The text classifiers `train --arch` builds: small, CPU-trainable, dropout where each is
normally trained with it (every site is sampled at serving time).

- `textcnn` (Kim 2014): embedding, dropout 0.2, convolutions of widths 3/4/5, max over time,
  dropout on the pooled features, linear.
- `bilstm`: embedding with dropout, a two-layer bidirectional LSTM (dropout between its layers),
  the max over real tokens of its outputs (BiLSTM-max, Conneau et al. 2017), dropout, linear.
- `transformer`: embedding + learned positions, two post-norm encoder layers (dropout 0.1 on
  attention weights, residual branches and the feed-forward block), mean pooling over real
  tokens, dropout, linear.
- `fasttext` (Joulin et al. 2017, without its n-grams): word dropout 0.3 (whole tokens zeroed,
  Iyyer et al. 2015), the mean of the token embeddings, linear. It sees every token of a long
  text at little cost. Hashed token bigrams and a hidden layer were tried on medical-abstracts
  and overfitted (docs/MODELS.md).
- `tfidf`: logistic regression on the text's TF-IDF vector of token unigrams and hashed
  bigrams (sublinear tf, smooth idf from the training rows, terms in fewer than 2 training
  texts dropped, L2-normalised: scikit-learn's TfidfVectorizer, computed in the graph from the
  ids), trained with n-gram dropout (each occurrence's evidence dropped with p = 0.5, a
  data-adaptive L2 penalty for a linear model: Wager et al. 2013) that MC passes sample.

All take token ids [B, L] padded with id `pad` and return logits [B, K].
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn

Arch = Literal["textcnn", "bilstm", "transformer", "fasttext", "tfidf"]
ARCHS: tuple[Arch, ...] = ("textcnn", "bilstm", "transformer", "fasttext", "tfidf")
EMBEDDING_DROPOUT = 0.2  # TextCNN: on the embedded tokens (word dropout's softer cousin)
WORD_DROPOUT = 0.3  # fasttext: share of tokens dropped from the average


@dataclass(frozen=True)
class TextNetConfig:
    arch: Arch
    vocab: int
    max_tokens: int
    classes: int
    pad: int = 0
    embed: int = 64
    width: int = 64  # filters per width (CNN), hidden per direction (LSTM), d_model (transformer)
    dropout: float = 0.5

    def describe(self) -> dict[str, Any]:
        return asdict(self)


class TextCNN(nn.Module):
    def __init__(self, c: TextNetConfig) -> None:
        super().__init__()
        self.emb = nn.Embedding(c.vocab, c.embed, padding_idx=c.pad)
        self.emb_drop = nn.Dropout(EMBEDDING_DROPOUT)
        self.convs = nn.ModuleList(nn.Conv1d(c.embed, c.width, k) for k in (3, 4, 5))
        self.drop = nn.Dropout(c.dropout)
        self.fc = nn.Linear(3 * c.width, c.classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.emb_drop(self.emb(tokens)).transpose(1, 2)
        pooled = [torch.relu(conv(x)).amax(dim=2) for conv in self.convs]
        return self.fc(self.drop(torch.cat(pooled, 1)))


class BiLSTM(nn.Module):
    def __init__(self, c: TextNetConfig) -> None:
        super().__init__()
        self.pad = c.pad
        self.emb = nn.Embedding(c.vocab, c.embed, padding_idx=c.pad)
        self.emb_drop = nn.Dropout(min(c.dropout, 0.3))
        self.rnn = nn.LSTM(
            c.embed, c.width, num_layers=2, dropout=min(c.dropout, 0.3), batch_first=True,
            bidirectional=True,
        )  # fmt: skip
        self.drop = nn.Dropout(c.dropout)
        self.fc = nn.Linear(2 * c.width, c.classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.emb_drop(self.emb(tokens)))
        # Max over the real tokens (BiLSTM-max): with the last states (the forward one read
        # after the padding) it did not learn medical-abstracts (held-out NLL 1.51, the class
        # prior's). The backward direction still reads the padding first, so the outputs depend
        # on the padded length, which is fixed per model. Outputs lie in (-1, 1): -1 masks.
        pooled = out.masked_fill(tokens.eq(self.pad).unsqueeze(-1), -1.0).amax(1)
        return self.fc(self.drop(pooled))


class Transformer(nn.Module):
    def __init__(self, c: TextNetConfig) -> None:
        super().__init__()
        self.pad = c.pad
        self.emb = nn.Embedding(c.vocab, c.width, padding_idx=c.pad)
        self.pos = nn.Embedding(c.max_tokens, c.width)
        layer = nn.TransformerEncoderLayer(
            c.width, 4, 2 * c.width, dropout=min(c.dropout, 0.1), batch_first=True
        )
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.drop = nn.Dropout(min(c.dropout, 0.1))
        self.fc = nn.Linear(c.width, c.classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pad = tokens.eq(self.pad)
        positions = torch.arange(tokens.size(1), device=tokens.device)
        x = self.enc(self.emb(tokens) + self.pos(positions), src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).float()
        pooled = (x * keep).sum(1) / keep.sum(1).clamp(min=1.0)
        return self.fc(self.drop(pooled))


class FastText(nn.Module):
    def __init__(self, c: TextNetConfig) -> None:
        super().__init__()
        self.pad = c.pad
        self.emb = nn.Embedding(c.vocab, c.embed, padding_idx=c.pad)
        # Dropout1d over [B, L, E] zeroes whole tokens ("word dropout", Iyyer et al. 2015)
        self.word_drop = nn.Dropout1d(WORD_DROPOUT)
        self.fc = nn.Linear(c.embed, c.classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        real = tokens.ne(self.pad).unsqueeze(-1).float()
        words = (self.word_drop(self.emb(tokens)) * real).sum(1)
        return self.fc(words / real.sum(1).clamp(min=1.0))


class TfIdf(nn.Module):
    """See the module docstring. `idf` is [vocab + BIGRAM_BUCKETS]: unigram then hashed-bigram
    idf, 0 for a term too rare to keep. A term's occurrences are counted once per text (before
    the dropout, in the engine's prefix); each occurrence then carries tfidf / count, so the
    occurrences of a term add up to its entry of the TF-IDF vector. Unigram tables read the ids
    directly (a bundle's vocabulary is read from the embeddings of the input)."""

    def __init__(self, c: TextNetConfig, idf: torch.Tensor) -> None:
        super().__init__()
        if c.max_tokens < 2:
            raise ValueError(
                f"a tfidf network reads bigrams: max_tokens must be >= 2 (got {c.max_tokens})"
            )
        self.pad, self.vocab = c.pad, c.vocab
        self.idf_unigram = _frozen(idf[: c.vocab])
        self.idf_bigram = _frozen(idf[c.vocab :])
        self.unigram = nn.Embedding(c.vocab, c.classes)
        self.bigram = nn.Embedding(BIGRAM_BUCKETS, c.classes)
        nn.init.zeros_(self.unigram.weight)
        nn.init.zeros_(self.bigram.weight)
        # After training (`compact`): bucket -> row of the kept buckets' tables (0: a zero row).
        self.bigram_row: nn.Embedding | None = None
        self.ngram_drop = nn.Dropout1d(c.dropout)  # [B, positions, K]: whole occurrences
        self.out = nn.Linear(c.classes, c.classes)  # the intercept (and an identity at start)
        with torch.no_grad():
            self.out.weight.copy_(torch.eye(c.classes))
            self.out.bias.zero_()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        real = tokens.ne(self.pad)
        pair = tokens[:, :-1] * self.vocab + tokens[:, 1:]
        bigram = pair - (pair // BIGRAM_BUCKETS) * BIGRAM_BUCKETS  # mod (no mod in bundles)
        real_bigram = (real[:, :-1] & real[:, 1:]).float()
        keep = torch.cat([real.float(), real_bigram], 1)
        counts = torch.cat(
            [
                _occurrences(tokens, real.float(), self.vocab),
                _occurrences(bigram, real_bigram, BIGRAM_BUCKETS),
            ],
            1,
        )
        rows = bigram if self.bigram_row is None else self.bigram_row(bigram).squeeze(-1).long()
        idf = torch.cat([self.idf_unigram(tokens), self.idf_bigram(rows)], 1).squeeze(-1)
        tfidf = (1.0 + torch.log(counts)) * idf * keep
        norm = torch.sqrt((tfidf * tfidf / counts).sum(1, keepdim=True)).clamp(min=1e-6)
        share = (tfidf / counts / norm).unsqueeze(-1)  # [B, positions, 1]
        evidence = torch.cat([self.unigram(tokens), self.bigram(rows)], 1) * share
        return self.out(self.ngram_drop(evidence).sum(1))

    @torch.no_grad()
    def compact(self) -> None:
        """Keep only the buckets with an idf (df >= MIN_DF): the others have share 0, so their
        weights never train and their evidence is 0. A frozen bucket -> row table (indices as
        floats, exact below 2^24) points the rest at one zero row. The same numbers, bit for
        bit; the medical-abstracts bundle shrank from 17 MB to 9 MB."""
        if self.bigram_row is not None:
            return
        kept = torch.nonzero(self.idf_bigram.weight[:, 0] != 0).flatten()
        index = torch.zeros(BIGRAM_BUCKETS)
        index[kept] = torch.arange(1, kept.numel() + 1, dtype=torch.float32)
        self.bigram_row = _frozen(index)
        self.idf_bigram = _frozen(torch.cat([torch.zeros(1), self.idf_bigram.weight[kept, 0]]))
        weights = torch.cat([torch.zeros(1, self.bigram.embedding_dim), self.bigram.weight[kept]])
        self.bigram = nn.Embedding.from_pretrained(weights, freeze=False)


def _frozen(values: torch.Tensor) -> nn.Embedding:
    """A lookup table of fixed values (idf): not trained."""
    table = nn.Embedding(values.numel(), 1)
    table.weight.data.copy_(values.reshape(-1, 1))
    table.weight.requires_grad_(False)
    return table


def _occurrences(ids: torch.Tensor, keep: torch.Tensor, size: int) -> torch.Tensor:
    """[B, L] ids in [0, size) -> how often each real position's id occurs among its row's real
    positions (`keep` 1.0, padding 0.0), as float; 1 at padding (whose evidence is zeroed
    anyway): added into a zeroed [B, size] table and read back. Linear in L (comparing every
    position with every other was 7x slower for 64 texts of 900 tokens); padding-made bigrams
    never add to a real bigram's count, even where their hashes collide."""
    table = ids.new_zeros((ids.shape[0], size), dtype=torch.float32)
    return table.scatter_add(1, ids, keep).gather(1, ids) + (1.0 - keep)


BIGRAM_BUCKETS = 262139  # a prime: hashed bigrams (about 6 times the distinct training bigrams)
MIN_DF = 2  # terms in fewer training texts get idf 0 (TfidfVectorizer's min_df)


def document_idf(ids: torch.Tensor, vocab: int, pad: int = 0) -> torch.Tensor:
    """Smooth idf, log((1 + n) / (1 + df)) + 1, of every unigram and hashed bigram over these
    texts' ids [N, L] (the training rows); 0 where df < MIN_DF."""
    n = ids.shape[0]
    df = torch.zeros(vocab + BIGRAM_BUCKETS, dtype=torch.float64)
    for row in ids:
        t = row[row.ne(pad)]
        grams = [t]
        if t.numel() > 1:
            grams.append((t[:-1] * vocab + t[1:]) % BIGRAM_BUCKETS + vocab)
        df[torch.unique(torch.cat(grams))] += 1
    idf = torch.log((1.0 + n) / (1.0 + df)) + 1.0
    return torch.where(df >= MIN_DF, idf, torch.zeros_like(idf)).float()


def build(c: TextNetConfig, ids: torch.Tensor | None = None) -> nn.Module:
    """A freshly initialised network (uses the global torch generator: seed it first). `tfidf`
    also needs the training rows' ids, for its idf."""
    if c.arch == "tfidf":
        if ids is None:
            raise ValueError("a tfidf network needs the training rows' ids for its idf")
        return TfIdf(c, document_idf(ids, c.vocab, c.pad))
    if c.arch == "textcnn":
        return TextCNN(c)
    if c.arch == "bilstm":
        return BiLSTM(c)
    if c.arch == "fasttext":
        return FastText(c)
    return Transformer(c)


class Average(nn.Module):
    """Several networks over one tokenizer, their probabilities averaged: returns the log of the
    mean softmax (softmax of it gives back the mean), so the engine treats it as logits. Member i
    reads the first `tokens[i]` ids (a TextCNN need not convolve 900 positions), or all of them
    for None (the bundle writer wants one embedding that reads the ids as given). Each member
    keeps its dropout sites; a Monte Carlo pass samples all of them."""

    def __init__(self, members: list[nn.Module], tokens: list[int | None]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.tokens = list(tokens)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        probs = [
            torch.softmax(m(ids if n is None else ids[:, :n]), -1)
            for m, n in zip(self.members, self.tokens, strict=True)
        ]
        return torch.log(torch.stack(probs, 0).mean(0).clamp(min=1e-12))
