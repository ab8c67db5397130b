import torch
from torch import nn
import service.training.text_nets as N
import service.training.text as T

class SWEM(nn.Module):
    """mean + max of embeddings (+ optional hashed bigrams), dropout, hidden, dropout, linear"""
    def __init__(self, c, bigrams=True, hidden=True, emb_drop=0.0):
        super().__init__()
        self.pad, self.vocab, self.buckets, self.use_bi = c.pad, c.vocab, c.bigram_buckets, bigrams
        self.emb = nn.Embedding(c.vocab, c.embed, padding_idx=c.pad)
        if bigrams: self.bigram = nn.Embedding(c.bigram_buckets, c.embed)
        self.tok_drop = nn.Dropout(emb_drop)
        self.hidden = nn.Linear(2 * c.embed, c.width) if hidden else None
        self.drop = nn.Dropout(c.dropout)
        self.drop2 = nn.Dropout(c.dropout)
        self.fc = nn.Linear(c.width if hidden else 2 * c.embed, c.classes)
    def forward(self, tokens):
        real = tokens.ne(self.pad)
        e = self.emb(tokens)
        m = real.unsqueeze(-1).float()
        if self.use_bi:
            pair = tokens[:, :-1] * self.vocab + tokens[:, 1:]
            pair = pair - (pair // self.buckets) * self.buckets
            pr = (real[:, :-1] & real[:, 1:]).unsqueeze(-1).float()
            e = torch.cat([e, self.bigram(pair)], 1)
            m = torch.cat([m, pr], 1)
        e = self.tok_drop(e)
        mean = (e * m).sum(1) / m.sum(1).clamp(min=1.0)
        mx = (e * m - (1 - m) * 1e4).amax(1)
        x = self.drop(torch.cat([mean, mx], 1))
        if self.hidden is not None:
            x = self.drop2(torch.relu(self.hidden(x)))
        return self.fc(x)

class FT(nn.Module):
    def __init__(self, c, bigrams=True, hidden=True):
        super().__init__()
        self.pad, self.vocab, self.buckets, self.use_bi = c.pad, c.vocab, c.bigram_buckets, bigrams
        self.emb = nn.Embedding(c.vocab, c.embed, padding_idx=c.pad)
        if bigrams: self.bigram = nn.Embedding(c.bigram_buckets, c.embed)
        self.drop = nn.Dropout(c.dropout)
        self.hidden = nn.Linear(c.embed, c.width) if hidden else None
        self.drop2 = nn.Dropout(c.dropout)
        self.fc = nn.Linear(c.width if hidden else c.embed, c.classes)
    def forward(self, tokens):
        real = tokens.ne(self.pad)
        e = self.emb(tokens); m = real.unsqueeze(-1).float()
        if self.use_bi:
            pair = tokens[:, :-1] * self.vocab + tokens[:, 1:]
            pair = pair - (pair // self.buckets) * self.buckets
            pr = (real[:, :-1] & real[:, 1:]).unsqueeze(-1).float()
            e = torch.cat([e, self.bigram(pair)], 1); m = torch.cat([m, pr], 1)
        x = self.drop((e * m).sum(1) / m.sum(1).clamp(min=1.0))
        if self.hidden is not None:
            x = self.drop2(torch.relu(self.hidden(x)))
        return self.fc(x)

def install(variant, **kw):
    orig = N.build
    def build(c):
        if variant == "swem": return SWEM(c, **kw)
        if variant == "ft": return FT(c, **kw)
        return orig(c)
    T.build = build

class DAN(nn.Module):
    """Iyyer et al. 2015: word dropout (whole tokens, Dropout1d over [B, L, E]), mean (+max),
    hidden layers with dropout, linear"""
    def __init__(self, c, word=0.3, hidden=1, use_max=False):
        super().__init__()
        self.pad, self.use_max = c.pad, use_max
        self.emb = nn.Embedding(c.vocab, c.embed, padding_idx=c.pad)
        self.word_drop = nn.Dropout1d(word)
        d = c.embed * (2 if use_max else 1)
        layers = []
        for _ in range(hidden):
            layers += [nn.Linear(d, c.width), nn.ReLU(), nn.Dropout(c.dropout)]
            d = c.width
        self.mlp = nn.Sequential(*layers)
        self.fc = nn.Linear(d, c.classes)
    def forward(self, tokens):
        real = tokens.ne(self.pad)
        m = real.unsqueeze(-1).float()
        e = self.word_drop(self.emb(tokens))
        x = (e * m).sum(1) / m.sum(1).clamp(min=1.0)
        if self.use_max:
            x = torch.cat([x, (e * m - (1 - m) * 1e4).amax(1)], 1)
        return self.fc(self.mlp(x))

_orig_install = install
def install(variant, **kw):
    if variant == "dan":
        T.build = lambda c: DAN(c, **kw)
    else:
        _orig_install(variant, **kw)
