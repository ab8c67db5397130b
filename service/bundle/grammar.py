"""The grammar of `architecture.json`: every name, target and value checked before building.

torch.fx writes a graph's targets and keyword names into Python source (the generated `forward`)
without escaping them, so a bundle string that reached it unchecked would run as code when the
bundle loads. Everything here is data validation against allow-lists and patterns; the writer
(through `rebuild`) and the loader run the same `check_description`, so a bundle the writer
would refuse never loads either. Limits bound what a few bytes of JSON may make the loader do.
"""

from __future__ import annotations

import inspect
import keyword
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from service.errors import BundleError

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,99}")
# A module path into the declared modules: identifiers or list indices (nn.Sequential's "0").
_PART = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,99}|[0-9]{1,9}")
# String constants in arguments (GELU's "tanh", Conv's "same", "zeros"): short, plain characters.
_STRING = re.compile(r"[A-Za-z0-9_.,:+ -]{0,64}")
_OPS = {"placeholder", "get_attr", "call_module", "call_function", "call_method", "output"}
_DTYPES = {"float32", "float64", "float16", "bfloat16", "int64", "int32", "bool"}
_VALUE_KEYS = {"node", "tuple", "dict", "slice", "ellipsis", "dtype"}
_MAX_DEPTH = 12
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass(frozen=True)
class ArchitectureLimits:
    """What a description may ask for; each refusal names the limit."""

    max_nodes: int = 10_000
    max_modules: int = 5_000
    max_values: int = 200_000  # numbers, strings and references in all arguments together
    max_activation_elements: int = 100_000_000  # values all nodes make for one input, summed
    # A recurrent layer's stack is built layer by layer, in time growing with its square: a
    # declared 40,000 took two minutes to build, before the weights could refuse it.
    max_recurrent_layers: int = 64
    # Python numbers and sequences the graph computes (shapes, repeat counts): pow(10, 10**8)
    # or [0] * 3e8 ran for minutes, or took gigabytes, inside the load's shape check.
    max_integer_bits: int = 64
    max_sequence: int = 10_000


def identifier(s: Any) -> bool:
    """A plain, non-dunder Python identifier that is not a keyword."""
    return (
        isinstance(s, str)
        and _IDENT.fullmatch(s) is not None
        and not keyword.iskeyword(s)
        and not s.startswith("__")
    )


def module_path(s: Any) -> bool:
    """A dotted path of identifiers and indices, at most 16 levels deep."""
    if not isinstance(s, str) or not s or len(s) > 400:
        return False
    parts = s.split(".")
    return len(parts) <= 16 and all(
        _PART.fullmatch(p) is not None and not keyword.iskeyword(p) and not p.startswith("__")
        for p in parts
    )


def constructor_signature(cls: type[nn.Module]) -> inspect.Signature:
    """The layer's constructor; LSTM and GRU take `*args, **kwargs`, read RNNBase's instead."""
    if issubclass(cls, nn.RNNBase):
        sig = inspect.signature(nn.RNNBase.__init__)
        return sig.replace(parameters=[p for n, p in sig.parameters.items() if n != "mode"])
    return inspect.signature(cls.__init__)


def constructor_parameters(cls: type[nn.Module], skip: set[str]) -> set[str]:
    """Keyword names the layer's constructor takes (the only keys its `args` may hold)."""
    params = constructor_signature(cls).parameters.values()
    return {
        p.name
        for p in params
        if p.name not in skip and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }


class _Checker:
    def __init__(self, where: str, limits: ArchitectureLimits) -> None:
        self.where = where
        self.limits = limits
        self.count = 0

    def fail(self, what: str) -> BundleError:
        return BundleError(f"{self.where}: {what}")

    def value(self, v: Any, at: str, nodes: set[str] | None, depth: int = 0) -> None:
        """A JSON value of `_encode`'s grammar; `nodes` None means no node references allowed."""
        self.count += 1
        if self.count > self.limits.max_values:
            raise self.fail(f"more than {self.limits.max_values} argument values (limit)")
        if depth > _MAX_DEPTH:
            raise self.fail(f"{at}: values nested deeper than {_MAX_DEPTH}")
        if v is None or isinstance(v, bool):
            return
        if isinstance(v, int):
            if v.bit_length() > self.limits.max_integer_bits:
                raise self.fail(f"{at}: an integer over {self.limits.max_integer_bits} bits")
            return
        if isinstance(v, float):
            if math.isnan(v):
                raise self.fail(f"{at}: NaN is not a valid argument")
            return
        if isinstance(v, str):
            if _STRING.fullmatch(v) is None:
                raise self.fail(f"{at}: string {v[:40]!r} is not a plain constant")
            return
        if isinstance(v, list):
            for i, x in enumerate(v):
                self.value(x, f"{at}[{i}]", nodes, depth + 1)
            return
        if not isinstance(v, dict) or len(v) != 1 or next(iter(v)) not in _VALUE_KEYS:
            raise self.fail(f"{at}: unknown value encoding")
        kind, inner = next(iter(v.items()))
        if kind == "node":
            if nodes is None or inner not in nodes:
                raise self.fail(f"{at}: reference to {str(inner)[:40]!r}, not an earlier node")
        elif kind == "tuple":
            self.value(_list(inner, at, self), at, nodes, depth + 1)
        elif kind == "slice":
            if len(_list(inner, at, self)) != 3:
                raise self.fail(f"{at}: a slice has three parts")
            self.value(inner, at, nodes, depth + 1)
        elif kind == "dict":
            if not isinstance(inner, dict) or not all(identifier(k) for k in inner):
                raise self.fail(f"{at}: dictionary keys must be plain identifiers")
            for k, x in inner.items():
                self.value(x, f"{at}.{k}", nodes, depth + 1)
        elif kind == "ellipsis":
            if inner is not True:
                raise self.fail(f"{at}: bad ellipsis")
        elif inner not in _DTYPES:  # dtype
            raise self.fail(f"{at}: dtype {str(inner)[:40]!r} is not one of {sorted(_DTYPES)}")


def _list(v: Any, at: str, c: _Checker) -> list[Any]:
    if not isinstance(v, list):
        raise c.fail(f"{at}: expected a list")
    return v


def check_description(
    desc: Any,
    *,
    where: str,
    modules_allowed: Mapping[str, type[nn.Module]],
    functions: Mapping[str, Any],
    methods: set[str],
    attributes: set[str],
    skip_params: set[str],
    limits: ArchitectureLimits,
) -> None:
    """Refuse any description outside the grammar, before a single layer is constructed."""
    c = _Checker(where, limits)
    if not isinstance(desc, dict) or set(desc) != {"format", "modules", "nodes"}:
        raise c.fail("an architecture is an object with exactly 'format', 'modules', 'nodes'")
    modules, nodes = desc["modules"], desc["nodes"]
    if not isinstance(modules, dict) or not isinstance(nodes, list):
        raise c.fail("'modules' must be an object and 'nodes' a list")
    if len(modules) > limits.max_modules:
        raise c.fail(f"{len(modules)} layers, over the limit of {limits.max_modules}")
    if len(nodes) > limits.max_nodes:
        raise c.fail(f"{len(nodes)} graph nodes, over the limit of {limits.max_nodes}")
    for qual, spec in modules.items():
        if not module_path(qual):
            raise c.fail(f"layer name {qual[:60]!r} is not a dotted path of identifiers")
        if not isinstance(spec, dict) or set(spec) != {"type", "args"}:
            raise c.fail(f"layer '{qual}' must have exactly 'type' and 'args'")
        cls = modules_allowed.get(spec["type"]) if isinstance(spec["type"], str) else None
        if cls is None:
            raise c.fail(f"layer '{qual}': type {str(spec['type'])[:40]!r} is not allowed")
        args = spec["args"]
        allowed = constructor_parameters(cls, skip_params)
        if not isinstance(args, dict) or not set(args) <= allowed:
            bad = sorted(set(args) - allowed) if isinstance(args, dict) else args
            raise c.fail(f"layer '{qual}' ({spec['type']}): unknown arguments {str(bad)[:80]}")
        for k, v in args.items():
            c.value(v, f"layer '{qual}'.{k}", None)
        if issubclass(cls, _BATCH_NORMS) and not args.get("track_running_stats", True):
            raise c.fail(
                f"layer '{qual}' ({spec['type']}): track_running_stats=False normalises with "
                "each batch's own statistics, in eval mode too, so an input's answer would "
                "depend on the inputs batched with it; train it with track_running_stats=True "
                "(the default), or use LayerNorm or GroupNorm"
            )
        layers = args.get("num_layers", 1)
        if isinstance(layers, int) and layers > limits.max_recurrent_layers:
            raise c.fail(
                f"layer '{qual}' ({spec['type']}): num_layers {layers} is over the limit of "
                f"{limits.max_recurrent_layers}"
            )
    seen: set[str] = set()
    for i, nd in enumerate(nodes):
        _check_node(c, i, nd, len(nodes), seen, modules, functions, methods, attributes)
        seen.add(nd["name"])
    if not nodes or nodes[-1]["op"] != "output":
        raise c.fail("the graph must end with its output node")


def _check_node(
    c: _Checker,
    i: int,
    nd: Any,
    count: int,
    seen: set[str],
    modules: Mapping[str, Any],
    functions: Mapping[str, Any],
    methods: set[str],
    attributes: set[str],
) -> None:
    if not isinstance(nd, dict) or set(nd) != {"name", "op", "target", "args", "kwargs"}:
        raise c.fail(f"node {i} must have exactly 'name', 'op', 'target', 'args', 'kwargs'")
    name, op, target = nd["name"], nd["op"], nd["target"]
    if not identifier(name) or name in seen:
        raise c.fail(f"node {i}: name {str(name)[:60]!r} is not a new plain identifier")
    at = f"node '{name}'"
    if op not in _OPS:
        raise c.fail(f"{at}: unknown node kind {str(op)[:40]!r}")
    if not isinstance(nd["args"], list) or not isinstance(nd["kwargs"], dict):
        raise c.fail(f"{at}: 'args' must be a list and 'kwargs' an object")
    if not all(identifier(k) for k in nd["kwargs"]):
        raise c.fail(f"{at}: keyword argument names must be plain identifiers")
    c.value(nd["args"], f"{at} args", seen)
    for k, v in nd["kwargs"].items():
        c.value(v, f"{at} kwargs.{k}", seen)
    if isinstance(nd["kwargs"].get("device"), str):  # a factory's device=: the same, and on
        # the load's meta run a named device made real memory (torch.arange(..., device="cpu"))
        raise c.fail(f"{at}: a named device; give device=x.device or none")
    if op == "placeholder":
        if not identifier(target) or nd["args"] or nd["kwargs"]:
            raise c.fail(f"{at}: an input is a plain identifier without arguments")
    elif op == "get_attr":
        if not module_path(target):
            raise c.fail(f"{at}: reads {str(target)[:60]!r}, not a dotted path of identifiers")
    elif op == "call_module":
        if not isinstance(target, str) or target not in modules:
            raise c.fail(f"{at} calls unknown layer {str(target)[:60]!r}")
    elif op == "call_function":
        if not isinstance(target, str) or target not in functions:
            raise c.fail(f"{at}: function {str(target)[:60]!r} is not allowed")
        args = nd["args"]
        if target == "builtins.getattr" and (len(args) != 2 or args[1] not in attributes):
            raise c.fail(f"{at}: attribute access is limited to {sorted(attributes)}")
    elif op == "call_method":
        if target not in methods:
            raise c.fail(f"{at}: tensor method {str(target)[:60]!r} is not allowed")
        values = [*nd["args"], *nd["kwargs"].values()]
        if target == "to" and any(isinstance(v, str) for v in values):
            # A dtype is encoded, a device read from a tensor; a named device ("meta", "cuda")
            # loaded fine and broke every request. The engine places the model itself.
            raise c.fail(f"{at}: '{target}' to a named device; only dtypes and x.device")
    elif i != count - 1 or target != "output" or len(nd["args"]) != 1 or nd["kwargs"]:
        raise c.fail(f"{at}: the output node (target 'output') comes last, with one argument")
