"""Randomness a bundle would not sample: dropout that exists only in train mode.

`save` traces in eval mode, so an undeclared locked dropout, a DropPath or `if self.training:
h = F.dropout(h)` leaves no trace: the bundle's MC passes would silently miss it. Here the model
runs twice in train mode with every dropout module the graph samples (and every normalisation
layer) in eval, under two seeds: outputs that differ are randomness the bundle leaves out.
A train/eval difference without randomness gives equal outputs and is not refused.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from service.engine.graph import DROPOUT_MODULES
from service.errors import ModelError

# Layers whose train mode is no randomness but batch statistics (or nothing): kept in eval.
NORMS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
)
Calls = list[tuple[str, tuple[float, ...], tuple[float, ...]]]  # (path, input, output) sums


@contextmanager
def kept_modes(module: nn.Module) -> Iterator[None]:
    """Every submodule's train/eval flag as it was, whatever happens inside."""
    modes = [(m, m.training) for m in module.modules()]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _sums(value: Any) -> tuple[float, ...]:
    """A cheap fingerprint of a value's tensors (sum and sum of squares each): not a copy."""
    if isinstance(value, torch.Tensor):
        v = value.detach().double()
        return (float(v.sum()), float((v * v).sum()))
    if isinstance(value, tuple | list):
        return tuple(s for item in value for s in _sums(item))
    if isinstance(value, dict):
        return tuple(s for item in value.values() for s in _sums(item))
    return ()


def _same(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return len(a) == len(b) and all(
        math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-6) or (math.isnan(x) and math.isnan(y))
        for x, y in zip(a, b, strict=True)
    )


def _run(module: nn.Module, example: torch.Tensor, seed: int) -> tuple[Any, Calls]:
    calls: Calls = []
    handles: list[RemovableHandle] = []
    for path, m in module.named_modules():
        if m.training:  # only these can hold the randomness

            def hook(m: nn.Module, args: Any, out: Any, path: str = path) -> None:
                calls.append((path, _sums(args), _sums(out)))

            handles.append(m.register_forward_hook(hook))
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            return module(example), calls
    finally:
        for h in handles:
            h.remove()


def _sources(a: Calls, b: Calls) -> list[str]:
    """Modules whose input was the same in both runs but whose output was not, innermost only."""
    if [p for p, _, _ in a] != [p for p, _, _ in b]:
        return []  # a different call order: nothing to pair
    found = {
        p
        for (p, ia, oa), (_, ib, ob) in zip(a, b, strict=True)
        if _same(ia, ib) and not _same(oa, ob)
    }
    inner = [
        p for p in found if not any(q != p and (p == "" or q.startswith(p + ".")) for q in found)
    ]
    return sorted(inner)


def check_hidden_dropout(plain: nn.Module, example: torch.Tensor) -> None:
    """Refuses randomness in train mode that is not one of the graph's dropout modules.

    `plain`: the module as save traces it (declared and sequence layers made explicit)."""
    with kept_modes(plain):
        plain.train()
        for m in plain.modules():
            if isinstance(m, (*DROPOUT_MODULES, *NORMS)):  # sampled by the bundle, or no noise
                m.eval()
        try:
            (one, calls1), (two, calls2) = _run(plain, example, 1), _run(plain, example, 2)
            again, _ = _run(plain, example, 1)
        except Exception:  # a forward that fails in train mode: nothing to compare
            return
    # Randomness is what the seed changes: a forward that differs under one seed keeps state
    # (a call counter), which is no dropout and not refused.
    if _same(_sums(one), _sums(two)) or not _same(_sums(one), _sums(again)):
        return
    names = [
        f"layer '{p}' ({type(plain.get_submodule(p)).__name__})" if p else "the model's forward()"
        for p in _sources(calls1, calls2)
    ]
    where = f"in {', '.join(names)}" if names else "in a layer that is in train mode"
    raise ModelError(
        f"the model draws random numbers in train mode that are not an nn.Dropout module ({where}):"
        " the same input gave two outputs in train mode with its dropout modules off. save traces"
        " in eval mode, where such dropout (an `if self.training:` F.dropout, a DropPath, a "
        "locked-dropout module) vanishes, so MC passes would not sample it: make it an "
        "nn.Dropout module, or declare a locked dropout with variational= (docs/BUNDLES.md); "
        "if it is noise meant for training only (augmentation), pass train_noise='allow'"
    )
