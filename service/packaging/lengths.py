"""Length buckets of a text model, chosen and checked at packaging (docs/BUNDLES.md).

A text runs padded to the smallest bucket that holds its own tokens (service/engine/buckets.py),
so a short text does not pay for `max_tokens`. That needs one graph for every length: the model
is traced with a free length (`tracer.LENGTH`) and the graph is checked against the user's module
at each bucket. `"auto"` (the default) also asks whether the model reads its padding: a text
padded to its bucket must answer as it does padded to `max_tokens` (the transformer of issue 20
masks its padding and pools over real tokens; an LSTM whose last state runs over the padding, or
a CNN max-pooled over time, does not). A model that fails either check keeps one length,
`max_tokens`, as before buckets. An explicit list is the packager's word that answers per bucket
are what they want; only the graph is checked.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import fx, nn

from service.errors import ModelError
from service.packaging.tracer import trace_with_shapes

Buckets = Sequence[int] | Literal["auto"] | None
SMALLEST = 16  # below this a forward's fixed costs dominate: shorter texts share this bucket
# The graph against the user's module: the writer's own tolerance (explicit attention sums in
# another order than torch's fused kernels). Padding invariance: float rounding of sums over
# other lengths only.
GRAPH_TOL = 1e-5
PAD_TOL = 1e-4


def default_buckets(max_tokens: int) -> list[int]:
    """Powers of two from 16 below `max_tokens`, then `max_tokens`."""
    out, n = [], SMALLEST
    while n < max_tokens:
        out.append(n)
        n *= 2
    return [*out, max_tokens]


def requested(buckets: Buckets, max_tokens: int) -> list[int] | None:
    """The lengths asked for, checked; None: one length (no buckets)."""
    if buckets is None:
        return None
    if buckets == "auto":
        lengths = default_buckets(max_tokens)
    else:
        lengths = sorted({int(b) for b in buckets})
    if not lengths or lengths[0] < 1 or lengths[-1] > max_tokens:
        raise ModelError(f"buckets must be lengths in [1, max_tokens={max_tokens}], got {buckets}")
    if lengths[-1] != max_tokens:
        lengths.append(max_tokens)
    return lengths if len(lengths) > 1 else None


def generic_graph(
    module: nn.Module, example: torch.Tensor, buckets: Buckets, pad_id: int
) -> tuple[fx.GraphModule, list[int]] | None:
    """A graph that serves every bucket length and the buckets, or None: trace for one length.
    `module` is the explicit (sequence.py) module in eval mode; `example` ids [B, max_tokens]."""
    lengths = requested(buckets, int(example.shape[1]))
    if lengths is None:
        return None
    auto = buckets == "auto"
    try:
        gm = trace_with_shapes(module, example, generic_length=True).eval()
        for n in lengths:
            _check_graph(module, gm, example[:, :n])
    except ModelError as exc:
        if auto:
            return None
        raise ModelError(
            f"buckets={list(lengths)}: the model's graph does not serve other lengths than "
            f"max_tokens ({exc}); read the length from the input (tokens.size(1)) instead of a "
            "constant, or pass buckets=None"
        ) from exc
    if auto and not _ignores_padding(gm, example, lengths, pad_id):
        return None
    return gm, lengths


def _check_graph(module: nn.Module, gm: fx.GraphModule, x: torch.Tensor) -> None:
    with torch.inference_mode():
        try:
            want = module(x)
        except Exception as exc:  # the user's own module refuses this length
            raise ModelError(f"the module fails at length {x.shape[1]}: {exc}") from exc
        got = gm(x)
    if want.shape != got.shape or not torch.allclose(want, got, rtol=GRAPH_TOL, atol=GRAPH_TOL):
        raise ModelError(f"the traced graph answers differently at length {x.shape[1]}")


def _ignores_padding(
    gm: fx.GraphModule, example: torch.Tensor, lengths: list[int], pad_id: int
) -> bool:
    """Texts that fill a bucket, and texts just over the bucket below, answer the same padded
    to their bucket and to max_tokens."""
    gen = torch.Generator().manual_seed(0)
    top = max(int(example.max()) + 1, 2)
    ids = torch.randint(0, top, (4, lengths[-1]), generator=gen)
    ids = torch.where(ids == pad_id, (pad_id + 1) % top, ids)
    below = 0
    for n in lengths[:-1]:
        for real in (n, below + 1):
            x = ids.clone()
            x[:, real:] = pad_id
            with torch.inference_mode():
                short, full = gm(x[:, :n]), gm(x)
            scale = max(1.0, float(full.abs().max()))
            if not torch.allclose(short, full, rtol=PAD_TOL, atol=PAD_TOL * scale):
                return False
        below = n
    return True
