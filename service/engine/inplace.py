"""In-place operations where the graph owns the tensor: fewer fresh activations per forward.

On the CPU every activation over 32 MiB is a fresh mmap() (glibc's largest heap block,
device.tune_allocator), so each costs its page faults and zero-filling on top of the pass that
writes it. Profiled on bench.text's transformer (B = 32, T = 20, every dropout site sampled), the
suffix allocated about 7 GB per call, the attention scores alone [640, 4, 256, 256] = 671 MB
four times per layer (scores, the masked copy, softmax, dropout); `copy_` (mostly first touches
of such fresh memory) was 19 % of the operators' time.

This rewrite turns an operation into its in-place form where its operand is a tensor that only
this graph references: the fresh result of an operation that always allocates (not a
placeholder: prefix values and gathered rows are never written), used by no other node, or a
view of such a tensor. The in-place forms compute the same numbers in the same order (an
addition or multiplication may write into its right operand: IEEE addition and multiplication
are commutative, bit for bit), so samples keep their bits (tested). Each is checked again at run
time (shapes, dtypes, a broadcast that would grow the operand) and falls back to the
out-of-place operation.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from service.engine.blocks import blocked_linear, replace_nodes
from service.engine.fused import MaskRows, apply_mask
from service.engine.graph import apply_keep

# Operations whose result is always a new tensor (never an alias of an operand).
_ALLOCATING_FUNCTIONS: set[Any] = {
    blocked_linear,
    apply_keep,
    torch.matmul,
    torch.bmm,
    torch.softmax,
    F.softmax,
    torch.relu,
    F.relu,
    F.gelu,
    F.layer_norm,
    torch.tanh,
    torch.sigmoid,
    operator.add,
    operator.mul,
    operator.sub,
    operator.truediv,
    torch.add,
    torch.mul,
}
_ALLOCATING_METHODS = {"masked_fill", "softmax", "matmul", "add", "mul", "sub", "div"}
_ALLOCATING_MODULES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.LayerNorm,
    nn.ReLU,
    nn.GELU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Softmax,
)
# Views: writing through one writes the tensor it views, which is fine where that tensor is owned
# and the view is its only use (`reshape` may copy instead: then the copy is owned).
_VIEW_METHODS = {"view", "transpose", "permute", "reshape", "unsqueeze", "squeeze", "flatten"}


def _owned(gm: fx.GraphModule, node: Any, user: fx.Node) -> bool:
    """Is `node` a tensor that only `user` reads and that this graph allocated?"""
    if not isinstance(node, fx.Node) or list(node.users) != [user]:
        return False
    if user.args.count(node) != 1 or node in user.kwargs.values():
        return False
    if node.op == "call_function":
        return node.target in _ALLOCATING_FUNCTIONS
    if node.op == "call_module":
        return type(gm.get_submodule(str(node.target))) in _ALLOCATING_MODULES
    if node.op == "call_method":
        if node.target in _ALLOCATING_METHODS:
            return True
        base = node.args[0]
        return node.target in _VIEW_METHODS and _owned(gm, base, node)
    return False


def _same_shape(out: torch.Tensor, *others: Any) -> bool:
    """Would `out` op= others keep out's shape and dtype (no broadcast that grows it)?"""
    if not all(torch.result_type(out, o) == out.dtype for o in others):
        return False
    shapes = [o.shape for o in others if isinstance(o, torch.Tensor)]
    return not shapes or torch.broadcast_shapes(out.shape, *shapes) == out.shape


def add_(owned: torch.Tensor, other: Any) -> Any:
    """owned + other (= other + owned) written into owned."""
    if isinstance(owned, torch.Tensor) and _same_shape(owned, other):
        return owned.add_(other)
    return owned + other


def mul_(owned: torch.Tensor, other: Any) -> Any:
    if isinstance(owned, torch.Tensor) and _same_shape(owned, other):
        return owned.mul_(other)
    return owned * other


def sub_(owned: torch.Tensor, other: Any) -> Any:
    if isinstance(owned, torch.Tensor) and _same_shape(owned, other):
        return owned.sub_(other)
    return owned - other


def div_(owned: torch.Tensor, other: Any) -> Any:
    if isinstance(owned, torch.Tensor) and _same_shape(owned, other):
        return owned.div_(other)
    return owned / other


def masked_fill_(owned: torch.Tensor, mask: torch.Tensor, value: Any) -> torch.Tensor:
    if torch.broadcast_shapes(owned.shape, mask.shape) == owned.shape:
        return owned.masked_fill_(mask, value)
    return owned.masked_fill(mask, value)


def softmax_(owned: torch.Tensor, dim: int) -> torch.Tensor:
    """Softmax over the last dimension written into its input (the same kernel, read and
    written element by element; checked against the out-of-place result in the tests)."""
    if owned.is_floating_point() and owned.is_contiguous() and dim in (-1, owned.dim() - 1):
        return torch.softmax(owned, dim, out=owned)
    return torch.softmax(owned, dim)


def relu_(owned: torch.Tensor) -> torch.Tensor:
    return torch.relu_(owned)


def apply_keep_(x: torch.Tensor, keep: torch.Tensor | MaskRows, scale: float) -> torch.Tensor:
    """graph.apply_keep, written into x (one row of x per mask row)."""
    if isinstance(keep, MaskRows):
        return apply_mask(x, keep, scale, inplace=keep.rows is None)
    if _same_shape(x, keep):
        return x.mul_(keep).mul_(scale)
    return x.mul(keep).mul_(scale)


_IN_PLACE = (add_, mul_, sub_, div_, masked_fill_, softmax_, relu_, apply_keep_)
for _f in _IN_PLACE:
    torch.fx.wrap(_f.__name__)
# Their results are the owned operand (or, where the run-time check declines, a new tensor).
_ALLOCATING_FUNCTIONS.update(_IN_PLACE)

_BINARY = {
    operator.add: (add_, True),  # (in-place form, commutative)
    torch.add: (add_, True),
    operator.mul: (mul_, True),
    torch.mul: (mul_, True),
    operator.sub: (sub_, False),
    operator.truediv: (div_, False),
}


def _replacement(gm: fx.GraphModule, n: fx.Node) -> tuple[Any, tuple[Any, ...]] | None:
    """The in-place form of node n and its arguments, where n may write into an operand."""
    args = n.args
    if n.op == "call_function" and n.target in _BINARY and not n.kwargs and len(args) == 2:
        fn, commutative = _BINARY[n.target]
        if _owned(gm, args[0], n):
            return fn, (args[0], args[1])
        if commutative and _owned(gm, args[1], n):
            return fn, (args[1], args[0])
    elif n.op == "call_function" and n.target is apply_keep and _owned(gm, args[0], n):
        return apply_keep_, tuple(args)
    elif n.op == "call_method" and n.target == "masked_fill" and not n.kwargs and len(args) == 3:
        if _owned(gm, args[0], n):
            return masked_fill_, tuple(args)
    elif n.op == "call_function" and n.target in (torch.softmax, F.softmax):
        dim = n.kwargs.get("dim", args[1] if len(args) > 1 else None)
        extra = set(n.kwargs) - {"dim"}
        if isinstance(dim, int) and not extra and len(args) <= 2 and _owned(gm, args[0], n):
            return softmax_, (args[0], dim)
    elif _is_relu(gm, n) and len(args) == 1 and not n.kwargs and _owned(gm, args[0], n):
        return relu_, (args[0],)
    return None


def _is_relu(gm: fx.GraphModule, n: fx.Node) -> bool:
    if n.op == "call_module":
        return type(gm.get_submodule(str(n.target))) is nn.ReLU
    return n.op == "call_function" and n.target in (torch.relu, F.relu)


def write_in_place(gm: fx.GraphModule) -> int:
    """Rewrite the graph's operations on owned tensors into their in-place forms, in place.
    Returns how many were rewritten."""

    def make(gm: fx.GraphModule, n: fx.Node) -> fx.Node | None:
        found = _replacement(gm, n)
        return None if found is None else gm.graph.call_function(*found)

    return replace_nodes(gm, make)
