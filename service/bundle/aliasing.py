"""In-place layers whose input is read again: the one aliasing a bundle cannot reproduce.

A bundle's layers are rebuilt without `inplace` (architecture.py skips it), so they compute out
of place. That is the same function unless the modified tensor has other readers: in torch,
`h = a(x); r = ReLU(inplace=True)(h); h + r` adds the rectified h to itself.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import fx

from service.errors import ModelError


def inplace_node(gm: fx.GraphModule, n: fx.Node) -> bool:
    if n.op == "call_module":
        return getattr(gm.get_submodule(str(n.target)), "inplace", False) is True
    if n.op != "call_function":
        return False
    try:  # F.relu(x, True) or F.relu(x, inplace=True)
        bound = inspect.signature(n.target).bind(*n.args, **n.kwargs)  # type: ignore[arg-type]
    except (TypeError, ValueError):  # builtins without a signature take no `inplace`
        return False
    return bound.arguments.get("inplace") is True


# Readers of a tensor's metadata only (h.shape[0], h.size(), h.dim()): its values do not matter.
_META_METHODS = {"size", "dim", "numel", "ndimension", "nelement"}
_META_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda"}


def reads_metadata(u: fx.Node) -> bool:
    if u.op == "call_method":
        return u.target in _META_METHODS
    if u.op == "call_function" and getattr(u.target, "__name__", "") == "getattr":
        return len(u.args) > 1 and u.args[1] in _META_ATTRS
    return False


def _layer(gm: fx.GraphModule, n: fx.Node) -> str:
    if n.op == "call_module":
        return f"layer '{n.target}' ({type(gm.get_submodule(str(n.target))).__name__})"
    stack: list[Any] = list((n.meta.get("nn_module_stack") or {}).values())
    where = f" in layer '{stack[-1][0]}'" if stack and stack[-1][0] else ""
    return f"{getattr(n.target, '__name__', n.target)}(inplace=True) at node '{n.name}'{where}"


def check_inplace(gm: fx.GraphModule) -> None:
    """Refuses an in-place op whose input is read again after it (the graph runs in node
    order: a reader before it saw the value as it was, as the bundle computes it)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for n in gm.graph.nodes:
        src = n.args[0] if n.args else None
        if not isinstance(src, fx.Node) or len(src.users) < 2 or not inplace_node(gm, n):
            continue
        others = sorted(u.name for u in src.users if order[u] > order[n] and not reads_metadata(u))
        if others:
            raise ModelError(
                f"{_layer(gm, n)} modifies its input '{src.name}' in place, and {others} read "
                "it too; a bundle computes out of place, so they would see another value: set "
                "inplace=False where the input is used again (and check the model still does "
                "what it was trained to), or use the layer's output in those places"
            )
