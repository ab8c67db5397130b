"""Trace a user's module with its shapes known: branches on shapes are taken, the batch stays free.

torch.fx's plain tracer refuses `if x.dim() == 2: x = x.view(-1, 1, 8, 8)` (a proxy cannot be a
branch condition), although such code only asks about shapes, which are fixed once the bundle
declares its input shape. This tracer carries a meta tensor (shape only, no memory) beside every
proxy: `dim()`, `ndim` and every size but the batch's answer with plain numbers, so the branch is
taken at packaging time; a size equal to the batch stays symbolic (a `size` node), so the graph
still serves any batch. The example batch is a prime no model dimension is likely to equal, and
the tracer refuses the input if one does. Branches on values (or on the batch size) stay refused.
"""

from __future__ import annotations

import copy
import operator
import os
import traceback
from typing import Any

import torch
from torch import fx, nn
from torch.fx.node import map_aggregate

from service.engine.graph import LeafTracer
from service.errors import ModelError

BATCH = 1031  # the example batch: a prime, so an equal model dimension is a coincidence we check
# The example length of a length-generic trace (text models with length buckets): sizes equal to
# it stay symbolic too, so one graph serves every bucket. Small: a recurrent layer on the meta
# device runs step by step (1,019 steps took a minute); a model dimension equal to it is
# harmless (its `size` node reads the same number at run time).
LENGTH = 31


# torch.nn.utils.rnn: packing asks for the lengths' values (on the CPU), which a trace has not
# got; its failure there read as a branch on values, with a fix that did not apply.
PACKED = (
    "packed sequences (torch.nn.utils.rnn.pack_padded_sequence and its kin) cannot be traced: "
    "they read each text's length as a number. Run the recurrent layer on the padded batch and "
    "pool with the padding mask (a masked mean or max over time, or the state at the last real "
    "token: gather at the length - 1), as docs/BUNDLES.md shows"
)
_RNN_UTILS = os.path.join("nn", "utils", "rnn.py")
_PACKING = {"pack_padded_sequence", "pad_packed_sequence", "pack_sequence", "unpack_sequence"}


def _in_packed_sequences(exc: BaseException) -> bool:
    """Whether `exc` was raised inside torch.nn.utils.rnn's packing (not pad_sequence: a shape
    error there keeps its own message)."""
    frames = traceback.extract_tb(exc.__traceback__)
    return any(f.filename.endswith(_RNN_UTILS) and f.name in _PACKING for f in frames)


class ShapeProxy(fx.Proxy):
    """A proxy whose shape questions are answered from its meta value."""

    @property
    def value(self) -> Any:
        return self.node.meta.get("mc_value")

    def _sizes(self) -> tuple[Any, ...]:
        t = self.value
        symbolic = getattr(self.tracer, "symbolic", (BATCH,))
        return tuple(
            self.tracer.create_proxy("call_method", "size", (self, i), {}) if n in symbolic else n
            for i, n in enumerate(t.shape)
        )

    def dim(self) -> int:
        return int(self.value.dim())

    @property
    def ndim(self) -> int:
        return int(self.value.dim())

    @property
    def dtype(self) -> torch.dtype:  # fixed by the declared input: a branch on it is a shape's
        return self.value.dtype

    def is_floating_point(self) -> bool:
        return bool(self.value.is_floating_point())

    @property
    def shape(self) -> tuple[Any, ...]:
        return self._sizes()

    def size(self, dim: int | None = None) -> Any:
        if dim is None:
            return self._sizes()
        return self._sizes()[dim]


class ShapeTracer(LeafTracer):
    def __init__(self, meta_root: nn.Module) -> None:
        super().__init__()
        self.meta_root = meta_root
        self.example: torch.Tensor | None = None
        self.symbolic: tuple[int, ...] = (BATCH,)  # sizes that stay `size` nodes

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return ShapeProxy(node, self)

    def create_proxy(
        self, kind: str, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
        name: str | None = None, type_expr: Any | None = None, proxy_factory_fn: Any = None,
    ) -> fx.Proxy:  # fmt: skip
        value = self._evaluate(kind, target, args, kwargs)
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        proxy.node.meta["mc_value"] = value
        return proxy

    def _evaluate(self, kind: str, target: Any, args: Any, kwargs: Any) -> Any:
        def val(a: Any) -> Any:
            v = a.node.meta.get("mc_value") if isinstance(a, fx.Proxy) else a
            # Tensors kept as plain attributes (not buffers) did not move with `.to("meta")`.
            return v.to("meta") if isinstance(v, torch.Tensor) and not v.is_meta else v

        a, k = map_aggregate(args, val), map_aggregate(kwargs, val)
        try:
            if kind == "placeholder":
                return self.example
            if kind == "call_function":
                return target(*a, **k)
            if kind == "call_method":
                if target == "cpu":  # a meta tensor cannot move; the graph refuses it later
                    return a[0]
                return getattr(a[0], target)(*a[1:], **k)
            if kind == "call_module":
                # forward, not __call__: the tracer has patched every module's __call__
                return self.meta_root.get_submodule(target).forward(*a, **k)
            if kind == "get_attr":
                return val(operator.attrgetter(target)(self.meta_root))
        except Exception as exc:  # the op itself is wrong for these shapes: say where
            raise ModelError(
                f"the model fails on an input of the declared shape at {kind} {target} "
                f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
            ) from exc
        return None


def trace_with_shapes(
    module: nn.Module, example: torch.Tensor, *, generic_length: bool = False
) -> fx.GraphModule:
    """Trace `module` for inputs shaped like `example` (its batch size is ignored). With
    `generic_length` (token ids [B, L]) the length stays free as well: traced at `LENGTH`, every
    size equal to it is read from the tensor at run time. Whether the graph then really serves
    other lengths (a model may slice a fixed table by a constant) is for the caller to check."""
    per_row = tuple(example.shape[1:])
    if BATCH in per_row:
        raise ModelError(f"an input dimension equals {BATCH}, the tracer's example batch size")
    if generic_length:
        if len(per_row) != 1:
            raise ModelError("a length-generic trace takes token ids of shape [B, L]")
        per_row = (LENGTH,)
    meta_root = copy.deepcopy(module).to("meta")
    tracer = ShapeTracer(meta_root)
    if generic_length:
        tracer.symbolic = (BATCH, LENGTH)
    tracer.example = torch.empty((BATCH, *per_row), dtype=example.dtype, device="meta")
    try:
        graph = tracer.trace(module)
    except Exception as exc:  # fx's TraceError and friends: a branch on a value
        if _in_packed_sequences(exc):
            raise ModelError(PACKED) from exc
        if isinstance(exc, ModelError):
            raise
        raise ModelError(
            f"the model cannot be traced ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            "branches on shapes are fine, but a forward that branches on tensor values or on "
            "the batch size is not: compute both sides and select with torch.where, or move "
            "the decision out of the model"
        ) from exc
    for node in graph.nodes:  # meta values served the trace; they must not reach the bundle
        node.meta.pop("mc_value", None)
    return fx.GraphModule(module, graph)
