"""Small token-sequence models, as users write them (issue 20): the three classifiers a new user
tried first, and one module per sequence layer the bundle vocabulary now holds."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from service.nn import VariationalDropout

VOCAB, LENGTH, PAD = 120, 16, 0


class TextCNN(nn.Module):
    """Kim (2014): embedding, convolutions of three widths, max over time, dropout, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 24, padding_idx=PAD)
        self.convs = nn.ModuleList(nn.Conv1d(24, 8, k) for k in (3, 4, 5))
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(24, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.emb(tokens).transpose(1, 2)
        pooled = [torch.relu(c(x)).amax(dim=2) for c in self.convs]
        return self.fc(self.drop(torch.cat(pooled, 1)))


class LSTMClassifier(nn.Module):
    """A stacked bidirectional LSTM (dropout between its layers), dropout on the last states."""

    def __init__(self, mode: str = "LSTM") -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16, padding_idx=PAD)
        rnn = nn.LSTM if mode == "LSTM" else nn.GRU
        self.rnn = rnn(16, 20, num_layers=2, dropout=0.3, batch_first=True, bidirectional=True)
        self.mode = mode
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(40, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        _, state = self.rnn(self.emb(tokens))
        h = state[0] if self.mode == "LSTM" else state
        return self.fc(self.drop(torch.cat([h[-2], h[-1]], dim=1)))


class TransformerClassifier(nn.Module):
    """Two encoder layers (dropout 0.1), learned positions, mean pooling over real tokens."""

    def __init__(
        self, norm_first: bool = False, batch_first: bool = True, length: int = LENGTH
    ) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Embedding(VOCAB, 32, padding_idx=PAD)
        self.pos = nn.Embedding(length, 32)
        layer = nn.TransformerEncoderLayer(
            32, 4, 64, dropout=0.1, batch_first=batch_first, norm_first=norm_first
        )
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.drop = nn.Dropout(0.1)
        self.fc = nn.Linear(32, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pad = tokens.eq(PAD)
        positions = torch.arange(tokens.size(1), device=tokens.device)
        x = self.emb(tokens) + self.pos(positions)
        if not self.batch_first:
            x = x.transpose(0, 1)
        x = self.enc(x, src_key_padding_mask=pad)
        if not self.batch_first:
            x = x.transpose(0, 1)
        keep = (~pad).unsqueeze(-1).float()
        pooled = (x * keep).sum(1) / keep.sum(1).clamp(min=1.0)
        return self.fc(self.drop(pooled))


class SinusoidalAttention(nn.Module):
    """A bare nn.MultiheadAttention (attention-weight dropout) over sinusoidal positions."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        pe = torch.zeros(LENGTH, 16)
        pos = torch.arange(LENGTH).unsqueeze(1)
        div = torch.exp(torch.arange(0, 16, 2) * (-math.log(10000.0) / 16))
        pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * div), torch.cos(pos * div)
        self.register_buffer("pe", pe.unsqueeze(0))
        self.attn = nn.MultiheadAttention(16, 2, dropout=0.2, batch_first=True)
        self.fc = nn.Linear(16, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.emb(tokens) + self.pe[:, : tokens.shape[1]]
        out, _ = self.attn(x, x, x, key_padding_mask=tokens.eq(PAD))
        return self.fc(out.mean(dim=1))


class GRUHead(nn.Module):
    """A single-layer GRU (no hidden dropout) with embedding dropout before it."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 12, padding_idx=PAD)
        self.drop = nn.Dropout(0.25)
        self.gru = nn.GRU(12, 10, batch_first=True)
        self.fc = nn.Linear(10, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(self.drop(self.emb(tokens)))
        return self.fc(out[:, -1])


class VariationalLSTM(nn.Module):
    """Gal & Ghahramani's LSTM classifier: embedding dropout with one mask per sequence
    (service.nn.VariationalDropout), a stacked LSTM whose between-layer dropout was trained
    shared over time too (declared at packaging: variational=["rnn"]), dropout on the mean."""

    def __init__(self, declared: bool = True) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16, padding_idx=PAD)
        self.drop_emb = VariationalDropout(0.25) if declared else nn.Dropout(0.25)
        self.rnn = nn.LSTM(16, 20, num_layers=2, dropout=0.3, batch_first=True)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(20, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.drop_emb(self.emb(tokens)))
        return self.fc(self.drop(out.mean(dim=1)))


class MaskProbe(nn.Module):
    """Its output is its dropout mask times the scale, flattened [B, L * 8]: an embedding of
    ones, then one dropout site (shared over time or not)."""

    def __init__(self, variational: bool) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)
        nn.init.ones_(self.emb.weight)
        self.drop = VariationalDropout(0.5) if variational else nn.Dropout(0.5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.drop(self.emb(tokens)).flatten(1)


def token_batch(n: int = 4, seed: int = 0, length: int = LENGTH) -> torch.Tensor:
    """[n, length] ids, the first with trailing padding."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(1, VOCAB, (n, length), generator=g)
    t[0, length // 2 :] = PAD
    return t


def wordpiece(texts: list[str]) -> Any:
    """A WordPiece tokenizer fitted here on `texts` (no hub), at most VOCAB entries, the same in
    every process (service.training's trainer: the library's breaks ties in hash-map order)."""
    from service.training.text_data import train_tokenizer

    return train_tokenizer(texts, vocab_size=VOCAB)


CORPUS = [
    "patient presents with chest pain and shortness of breath",
    "no evidence of malignancy in the resected specimen",
    "mild gastritis with helicobacter pylori infection",
    "acute ischemic stroke in the left middle cerebral artery",
] * 5


def save_text_model(out_dir: Any, name: str = "notes", intended_use: str = "tests only") -> Any:
    """A small TextCNN with a WordPiece tokenizer trained on CORPUS, saved as <name>/1."""
    from service.packaging import save

    torch.manual_seed(0)
    return save(
        TextCNN().eval(), token_batch(), out_dir=out_dir, name=name, version="1",
        task="classification", intended_use=intended_use, labels=["a", "b", "c"],
        tokenizer=wordpiece(CORPUS),
    )  # fmt: skip
