"""Variational dropout declared at packaging: the named sites get one mask per sequence.

A model trained with variational ("locked") dropout (Gal & Ghahramani 2016) drew one mask per
sequence and used it at every time step. Its MC passes must do the same, or the uncertainty they
report is not the model's. Either the model already holds `service.nn.VariationalDropout` (the
engine samples it so), or `save(..., variational=[names])` names the sites trained so:
- an `nn.Dropout`, or a module of the user's own with a float `p` and no weights (an AWD-LSTM
  style `LockedDropout` whose forward is the identity in eval mode, so tracing alone would lose
  it), becomes `VariationalDropout(p)`;
- a stacked `nn.LSTM`/`nn.GRU` with dropout gets its between-layer dropout shared over time.
The hidden-to-hidden mask of Gal & Ghahramani's full variant is refused: torch's LSTM/GRU have
none and run their steps in one kernel, and a cell loop (nn.LSTMCell) is not in the bundle
vocabulary. Each site's input must be batch-first [B, L, *features] (checked by the engine's
split, service/engine/graph.py).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from torch import nn

from service.bundle.sequence import StackedRNN
from service.engine.graph import DROPOUT_MODULES
from service.errors import ModelError
from service.nn import VariationalDropout

RECURRENT = (
    "recurrent (hidden-to-hidden) dropout shared over time is not supported: a bundle runs "
    "LSTM/GRU steps in torch's fused kernel, which has no such mask"
)


def declare(module: nn.Module, names: Sequence[str] | str) -> nn.Module:
    """A copy of `module` whose named dropout sites are shared over time (see the docstring)."""
    wanted = [names] if isinstance(names, str) else list(names)
    if len(set(wanted)) != len(wanted):
        raise ModelError(f"variational={wanted}: a site is named twice")
    module = copy.deepcopy(module)
    known = dict(module.named_modules())
    for name in wanted:
        if not name or name not in known:
            sites = [n for n, m in known.items() if n and _is_site(m)]
            raise ModelError(
                f"variational: the model has no submodule {name!r}; name dropout modules or "
                f"stacked LSTM/GRU layers by their path in the model, e.g. one of {sites[:8]}"
            )
        parent_name, _, attr = name.rpartition(".")
        setattr(known[parent_name], attr, _variational(name, known[name]))
    return module


def _is_site(m: nn.Module) -> bool:
    return isinstance(m, (*DROPOUT_MODULES, nn.LSTM, nn.GRU)) or _own_dropout(m) is not None


def _own_dropout(m: nn.Module) -> float | None:
    """The rate of a user's own dropout module (a float `p`, no weights, no children)."""
    p = getattr(m, "p", None)
    plain = next(m.parameters(), None) is None and next(m.children(), None) is None
    if plain and isinstance(p, float) and 0.0 < p < 1.0:
        return p
    return None


def _variational(name: str, m: nn.Module) -> nn.Module:
    if isinstance(m, VariationalDropout):
        return m
    if isinstance(m, nn.RNNCellBase):
        raise ModelError(f"variational: '{name}' is a {type(m).__name__}; {RECURRENT}")
    if isinstance(m, nn.LSTM | nn.GRU):
        if m.num_layers < 2 or float(m.dropout) <= 0:
            raise ModelError(
                f"variational: '{name}' ({type(m).__name__}, num_layers={m.num_layers}, "
                f"dropout={m.dropout}) has no dropout between layers to share over time; name "
                f"the dropout on its inputs or outputs instead. ({RECURRENT})"
            )
        return StackedRNN(m, variational=True)
    if type(m) is nn.Dropout:
        return VariationalDropout(float(m.p))
    if isinstance(m, DROPOUT_MODULES):
        raise ModelError(
            f"variational: '{name}' is {type(m).__name__} (channel dropout); only an "
            "elementwise nn.Dropout can be shared over time"
        )
    p = _own_dropout(m)
    if p is None:
        raise ModelError(
            f"variational: '{name}' ({type(m).__name__}) is not a dropout module; name an "
            "nn.Dropout, a stacked LSTM/GRU, or a module of your own with a float attribute p "
            "(its dropout rate), or use service.nn.VariationalDropout in the model"
        )
    return VariationalDropout(p)
