"""Sequence layers rebuilt from explicit operations, so that every dropout site is an `nn.Dropout`.

torch hides dropout inside `nn.MultiheadAttention` (on the attention weights, functional), inside
stacked `nn.LSTM`/`nn.GRU` (between layers, in the fused kernel) and behind
`nn.TransformerEncoderLayer`'s fast path, which torch.fx cannot trace through
(`../shared/reference/sequence-models.md`). `explicit(module)` returns a copy of a user's module
where each of those is replaced by the equivalent below, with the same weights: the MC engine then
sees, masks and samples every site. All layers here work batch-first inside (the engine's rows are
dimension 0); a seq-first layer transposes at its edges, so its outputs keep the user's layout.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from service.errors import ModelError
from service.nn import VariationalDropout


class ExplicitAttention(nn.Module):
    """`nn.MultiheadAttention` as projections, softmax(Q K^T / sqrt(d) + mask), an explicit
    dropout on the attention weights [B, heads, L, S], and the output projection."""

    def __init__(
        self, embed_dim: int, num_heads: int, dropout: float = 0.0, batch_first: bool = False,
        kdim: int | None = None, vdim: int | None = None, bias: bool = True,
    ) -> None:  # fmt: skip
        super().__init__()
        self.embed_dim, self.num_heads, self.batch_first = embed_dim, num_heads, batch_first
        self.head_dim = embed_dim // num_heads
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(kdim or embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(vdim or embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.dropout = nn.Dropout(dropout)

    @classmethod
    def of(cls, m: nn.MultiheadAttention) -> ExplicitAttention:
        if m.bias_k is not None or m.add_zero_attn:
            raise ModelError(
                "MultiheadAttention with add_bias_kv or add_zero_attn is not supported"
            )
        bias = m.in_proj_bias is not None
        new = cls(m.embed_dim, m.num_heads, m.dropout, m.batch_first, m.kdim, m.vdim, bias)
        e = m.embed_dim
        with torch.no_grad():
            if m._qkv_same_embed_dim:
                w = m.in_proj_weight
                ws = (w[:e], w[e : 2 * e], w[2 * e :])
            else:
                ws = (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight)
            for proj, wi, i in zip((new.q_proj, new.k_proj, new.v_proj), ws, range(3), strict=True):
                proj.weight.copy_(wi)
                if bias:
                    proj.bias.copy_(m.in_proj_bias[i * e : (i + 1) * e])
            new.out_proj.weight.copy_(m.out_proj.weight)
            if m.out_proj.bias is not None:
                new.out_proj.bias.copy_(m.out_proj.bias)
        return new

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
        attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
        if is_causal and attn_mask is None:  # torch refuses the hint alone too
            raise ModelError("is_causal needs the causal mask itself: pass it as attn_mask")
        if not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        b, length, _ = query.shape
        s = key.shape[1]
        h, d = self.num_heads, self.head_dim
        q = self.q_proj(query).view(b, length, h, d).transpose(1, 2)
        k = self.k_proj(key).view(b, s, h, d).transpose(1, 2)
        v = self.v_proj(value).view(b, s, h, d).transpose(1, 2)
        scores = torch.matmul(q * (1.0 / math.sqrt(d)), k.transpose(-2, -1))  # [B, h, L, S]
        if attn_mask is not None:
            scores = _add_mask(scores, attn_mask)
        if key_padding_mask is not None:
            scores = _add_mask(scores, key_padding_mask.view(b, 1, 1, s))
        # torch returns the weights after their dropout (train mode): MC passes see them so too
        weights = self.dropout(torch.softmax(scores, dim=-1))
        out = torch.matmul(weights, v).transpose(1, 2).reshape(b, length, -1)
        out = self.out_proj(out)
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, weights.mean(dim=1) if average_attn_weights else weights


def _add_mask(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A boolean mask (True = do not attend) as -inf, a float mask added, as torch does."""
    if mask.dtype == torch.bool:
        return scores.masked_fill(mask, float("-inf"))
    return scores + mask


class ExplicitEncoderLayer(nn.Module):
    """`nn.TransformerEncoderLayer` without its fast path: four explicit dropout sites."""

    def __init__(self, m: nn.TransformerEncoderLayer) -> None:
        super().__init__()
        self.self_attn = ExplicitAttention.of(m.self_attn)
        self.self_attn.batch_first = True  # the layer transposes once at its edges
        self.linear1, self.dropout, self.linear2 = m.linear1, m.dropout, m.linear2
        self.norm1, self.norm2 = m.norm1, m.norm2
        self.dropout1, self.dropout2 = m.dropout1, m.dropout2
        self.norm_first, self.batch_first = m.norm_first, m.self_attn.batch_first
        act = m.activation
        if act is F.relu or isinstance(act, nn.ReLU):
            self.activation: nn.Module = nn.ReLU()
        elif act is F.gelu or isinstance(act, nn.GELU):
            self.activation = nn.GELU()
        elif isinstance(act, nn.Module):
            self.activation = act
        else:
            raise ModelError(f"TransformerEncoderLayer activation {act!r} is not supported")

    def forward(
        self, src: torch.Tensor, src_mask: torch.Tensor | None = None,
        src_key_padding_mask: torch.Tensor | None = None, is_causal: bool = False,
    ) -> torch.Tensor:  # fmt: skip
        x = src if self.batch_first else src.transpose(0, 1)
        if self.norm_first:
            x = x + self._sa(self.norm1(x), src_mask, src_key_padding_mask)
            x = x + self._ff(self.norm2(x))
        else:
            x = self.norm1(x + self._sa(x, src_mask, src_key_padding_mask))
            x = self.norm2(x + self._ff(x))
        return x if self.batch_first else x.transpose(0, 1)

    def _sa(
        self, x: torch.Tensor, mask: torch.Tensor | None, pad: torch.Tensor | None
    ) -> torch.Tensor:
        out = self.self_attn(x, x, x, key_padding_mask=pad, need_weights=False, attn_mask=mask)[0]
        return self.dropout1(out)

    def _ff(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))


class ExplicitEncoder(nn.Module):
    """`nn.TransformerEncoder`: its layers in turn, then the optional norm (no nested tensors:
    padded positions get their computed values instead of zeros; pool with the padding mask)."""

    def __init__(self, m: nn.TransformerEncoder) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ExplicitEncoderLayer(layer) for layer in m.layers)
        self.norm = m.norm

    def forward(
        self, src: torch.Tensor, mask: torch.Tensor | None = None,
        src_key_padding_mask: torch.Tensor | None = None, is_causal: bool | None = None,
    ) -> torch.Tensor:  # fmt: skip
        out = src
        for layer in self.layers:
            out = layer(out, src_mask=mask, src_key_padding_mask=src_key_padding_mask)
        return self.norm(out) if self.norm is not None else out


class StackedRNN(nn.Module):
    """A multi-layer `nn.LSTM`/`nn.GRU` with dropout as single-layer RNNs with an explicit
    `nn.Dropout` between layers (on each layer's output but the last, as torch applies it).
    `variational`: those dropouts are `VariationalDropout`, one mask per sequence shared over
    time (a model trained so, declared at packaging: service/packaging/variational.py)."""

    def __init__(self, m: nn.LSTM | nn.GRU, variational: bool = False) -> None:
        super().__init__()
        self.mode, self.batch_first = m.mode, m.batch_first
        if m.proj_size:
            raise ModelError("LSTM with proj_size is not supported in a bundle")
        dirs = 2 if m.bidirectional else 1
        cls = nn.LSTM if m.mode == "LSTM" else nn.GRU
        self.layers = nn.ModuleList()
        for i in range(m.num_layers):
            layer = cls(
                m.input_size if i == 0 else m.hidden_size * dirs, m.hidden_size, num_layers=1,
                bias=m.bias, batch_first=True, bidirectional=m.bidirectional,
            )  # fmt: skip
            with torch.no_grad():
                for name, p in layer.named_parameters():
                    p.copy_(getattr(m, name.replace("_l0", f"_l{i}")))
            self.layers.append(layer)
        drop = VariationalDropout if variational else nn.Dropout
        self.drops = nn.ModuleList(drop(m.dropout) for _ in range(m.num_layers - 1))

    def forward(self, x: torch.Tensor, hx: object = None) -> tuple[torch.Tensor, object]:
        x = x if self.batch_first else x.transpose(0, 1)
        dirs = 2 if self.layers[0].bidirectional else 1
        # States are kept batch-first ([B, dirs, H]) until the end: the MC engine's rows are
        # dimension 0, so a deterministic first layer's state stays in the once-per-input part.
        hs, cs = [], []
        for i, layer in enumerate(self.layers):
            x, state = layer(x, _layer_state(hx, i * dirs, (i + 1) * dirs))
            if self.mode == "LSTM":
                hs.append(state[0].transpose(0, 1))
                cs.append(state[1].transpose(0, 1))
            else:
                hs.append(state.transpose(0, 1))
            if i < len(self.drops):
                x = self.drops[i](x)
        out = x if self.batch_first else x.transpose(0, 1)
        h = torch.cat(hs, 1).transpose(0, 1)  # [layers * dirs, B, H], as torch returns it
        return (out, (h, torch.cat(cs, 1).transpose(0, 1))) if self.mode == "LSTM" else (out, h)


def _layer_state(hx: object, lo: int, hi: int) -> object:
    """One layer's slice of an initial state [layers * dirs, B, H] (an LSTM's: a pair)."""
    if hx is None:
        return None
    if isinstance(hx, tuple):
        return tuple(h[lo:hi] for h in hx)
    return hx[lo:hi]  # type: ignore[index]


def explicit(module: nn.Module) -> nn.Module:
    """A copy of `module` with every hidden-dropout sequence layer made explicit (same weights)."""
    module = copy.deepcopy(module)
    if (swapped := _swap(module)) is not None:
        return swapped
    for name, child in list(module.named_children()):
        setattr(module, name, explicit(child))
    return module


def _swap(m: nn.Module) -> nn.Module | None:
    if isinstance(m, nn.TransformerEncoder):
        return ExplicitEncoder(m)
    if isinstance(m, nn.TransformerEncoderLayer):
        return ExplicitEncoderLayer(m)
    if isinstance(m, nn.MultiheadAttention):
        return ExplicitAttention.of(m)
    if isinstance(m, nn.LSTM | nn.GRU) and m.num_layers > 1 and m.dropout > 0:
        return StackedRNN(m)
    # A subclass that only renames nn.Dropout (class MCDropout(nn.Dropout): pass): the plain
    # module, which the tracer keeps as a site. One that overrides forward is traced through.
    for base in (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d):
        if type(m) is not base and isinstance(m, base) and type(m).forward is base.forward:
            return base(m.p, m.inplace)  # inplace kept: aliasing.py judges it
    return None
