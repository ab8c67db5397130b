"""A stack of MC-dropout MLPs trained as one vectorised model.

Every (split, grid configuration) pair is one model m; its weights are slice m of tensors shaped
[M, in, out], so one `torch.baddbmm` per layer runs all of them. The loss is a sum over models,
hence each slice gets exactly the gradient it would get alone, and Adam (an elementwise update)
keeps independent state per slice.

Randomness is drawn per split, from that split's own generator, and shared by all models of the
split ("common random numbers"): the same initial weights, the same minibatch order and the same
uniform numbers behind the dropout masks (model m keeps a unit where u >= p_m). A model's training
therefore does not depend on which other configurations or splits share the stack, and comparisons
between configurations on validation data are less noisy.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

Task = Literal["regression", "classification"]


@dataclass
class Stack:
    """M MLPs of identical layer sizes; dropout with rate dropout[m] before every Linear."""

    weights: list[Tensor]  # layer l: [M, in_l, out_l]
    biases: list[Tensor]  # layer l: [M, 1, out_l]
    dropout: Tensor  # [M]
    split_of: Tensor  # [M], index into the per-split data and generators

    def __post_init__(self) -> None:
        m = self.split_of.numel()
        self.n_splits = int(self.split_of.max()) + 1
        g = m // self.n_splits
        grid = torch.arange(self.n_splits).repeat_interleave(g)
        # Split-major with G models per split: per-split tensors broadcast over an [S, G] view
        # instead of being gathered (copied) once per model. 0: no such layout, gather.
        regular = g * self.n_splits == m and torch.equal(self.split_of, grid)
        self.per_split = g if regular else 0

    @property
    def n_models(self) -> int:
        return int(self.dropout.shape[0])

    def parameters(self) -> list[Tensor]:
        return [*self.weights, *self.biases]


def init_stack(
    dims: Sequence[int], dropout: Tensor, split_of: Tensor, gens: Sequence[torch.Generator]
) -> Stack:
    """Glorot-uniform weights and zero biases (the Keras defaults of the 2016 code)."""
    weights, biases = [], []
    for fan_in, fan_out in itertools.pairwise(dims):
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        per_split = torch.stack([torch.rand(fan_in, fan_out, generator=g) for g in gens])
        w = (per_split * 2.0 - 1.0) * bound
        weights.append(w[split_of].clone().requires_grad_(True))
        biases.append(torch.zeros(len(split_of), 1, fan_out, requires_grad=True))
    return Stack(weights, biases, dropout.to(torch.float32), split_of)


def _per_model(stack: Stack, t: Tensor) -> Tensor:
    """[S, ...] per-split tensor -> [M, ...], row m taken from split split_of[m]."""
    if stack.per_split == 1:
        return t
    if stack.per_split:
        shape = (stack.n_splits, stack.per_split, *t.shape[1:])
        return t.unsqueeze(1).expand(shape).reshape(stack.n_models, *t.shape[1:])
    return t[stack.split_of]


def forward(
    stack: Stack, x: Tensor, gens: Sequence[torch.Generator], inplace: bool = False
) -> Tensor:
    """Per-split inputs x [S, R, in] -> [M, R, out] with fresh dropout masks.

    Inverted dropout as nn.Dropout: a unit is dropped where u < p, the 1 / (1 - p) rescaling is
    folded into the next layer's weights (cheaper than scaling the activations).
    `inplace` (inference only) reuses activation buffers.
    """
    n_models, n_layers = stack.n_models, len(stack.weights)
    scale = (1.0 / (1.0 - stack.dropout))[:, None, None]
    h = x
    for i, (w, b) in enumerate(zip(stack.weights, stack.biases, strict=True)):
        rows, width = int(h.shape[-2]), int(h.shape[-1])
        u = torch.stack([torch.rand((rows, width), generator=g) for g in gens])
        if stack.per_split:
            s, g = stack.n_splits, stack.per_split
            drop = u.unsqueeze(1) < stack.dropout.view(s, g, 1, 1)  # [S, G, R, W]
            hv = h.unsqueeze(1) if i == 0 else h.view(s, g, rows, width)
            if inplace and i > 0:
                h = hv.masked_fill_(drop, 0.0).view(n_models, rows, width)
            else:
                h = torch.where(drop, 0.0, hv).reshape(n_models, rows, width)
        else:
            drop = u[stack.split_of] < stack.dropout[:, None, None]
            h = (h[stack.split_of] if i == 0 else h).masked_fill(drop, 0.0)
        h = torch.baddbmm(b, h, w * scale)
        if i < n_layers - 1:
            h = h.relu_() if inplace else torch.relu(h)
    return h


def _apply_weight_decay(stack: Stack, decay: Tensor) -> None:
    # Keras `l2(reg)` adds reg * sum(W^2) to the loss: gradient 2 * reg * W, weights only.
    for w in stack.weights:
        assert w.grad is not None
        w.grad.add_(w.detach() * (2.0 * decay)[:, None, None])


def fit(
    stack: Stack,
    xs: Tensor,
    ys: Tensor,
    decay: Tensor,
    gens: Sequence[torch.Generator],
    *,
    epochs: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    task: Task = "regression",
    learned_noise: bool = False,
    on_epoch: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train in place on per-split data xs [S, N, in], ys [S, N, out] (float) or [S, N] (labels).

    Each epoch shuffles each split's rows with its generator and walks them in minibatches of
    `batch_size` (the last one smaller, as Keras does). Returns the mean loss per epoch.
    `learned_noise` (regression): the net outputs D means then D log-variances v and the loss is
    the Gaussian negative log-likelihood 0.5 (v + (y - mean)^2 e^-v) per target, constants
    dropped (Kendall & Gal 2017); else squared error.
    """
    n_splits, n_rows = int(xs.shape[0]), int(xs.shape[1])
    opt = torch.optim.Adam(stack.parameters(), lr=lr)
    split_rows = torch.arange(n_splits)[:, None]
    history: list[float] = []
    for epoch in range(epochs):
        perm = torch.stack([torch.randperm(n_rows, generator=g) for g in gens])
        total, batches = 0.0, 0
        for start in range(0, n_rows, batch_size):
            idx = perm[:, start : start + batch_size]
            xb, yb = xs[split_rows, idx], _per_model(stack, ys[split_rows, idx])
            out = forward(stack, xb, gens)
            if task == "regression" and learned_noise:
                d = int(yb.shape[-1])
                v = out[..., d:]
                per_model = (0.5 * (v + (out[..., :d] - yb).square() * torch.exp(-v))).mean((1, 2))
            elif task == "regression":
                per_model = (out - yb).square().mean(dim=(1, 2))  # Keras MSE: mean over rows
            else:
                logits = out.reshape(-1, out.shape[-1])
                ce = nn.functional.cross_entropy(logits, yb.reshape(-1), reduction="none")
                per_model = ce.reshape(out.shape[0], -1).mean(dim=1)
            loss = per_model.sum()  # a sum keeps the models' gradients independent
            opt.zero_grad(set_to_none=False)
            loss.backward()
            _apply_weight_decay(stack, decay)
            opt.step()
            total += float(loss.detach()) / stack.n_models
            batches += 1
        history.append(total / max(batches, 1))
        if on_epoch is not None:
            on_epoch(epoch, history[-1])
    for t in stack.parameters():
        t.requires_grad_(False)
    return history


def mc_chunks(
    stack: Stack,
    xs: Tensor,
    passes: int,
    gens: Sequence[torch.Generator],
    max_elements: int = 1 << 24,
) -> Iterator[tuple[slice, Tensor]]:
    """MC outputs on per-split inputs xs [S, R, in], chunk by chunk over rows.

    Yields (rows, out) with out [M, passes, len(rows), out]; rows are laid out pass-major
    (row t * c + i), the same layout as `mc_predict`. A chunk holds at most about `max_elements`
    activations in its widest layer.
    """
    widest = max(max(w.shape[1], w.shape[2]) for w in stack.weights)
    n_rows = int(xs.shape[1])
    chunk = max(1, max_elements // (stack.n_models * passes * int(widest)))
    with torch.inference_mode():
        for start in range(0, n_rows, chunk):
            xc = xs[:, start : start + chunk]
            c = int(xc.shape[1])
            out = forward(stack, xc.repeat(1, passes, 1), gens, inplace=True)
            yield slice(start, start + c), out.reshape(stack.n_models, passes, c, -1)


def to_sequential(stack: Stack, m: int, p: float | None = None) -> nn.Sequential:
    """Model m as Dropout, Linear, ReLU, Dropout, ..., Linear (plain modules, CPU, eval mode).

    `p` overrides the stored rate, which is float32 (0.05 would read 0.05000000074505806).
    """
    p = float(stack.dropout[m]) if p is None else p
    layers: list[nn.Module] = []
    n_layers = len(stack.weights)
    for i, (w, b) in enumerate(zip(stack.weights, stack.biases, strict=True)):
        lin = nn.Linear(int(w.shape[1]), int(w.shape[2]))
        with torch.no_grad():
            lin.weight.copy_(w[m].T)
            lin.bias.copy_(b[m, 0])
        layers += [nn.Dropout(p), lin]
        if i < n_layers - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).eval()
