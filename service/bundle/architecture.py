"""A declarative architecture: the traced torch.fx graph as JSON, rebuilt from a whitelist.

Loading a bundle must not run code from the bundle. The graph names only whitelisted layer
classes (constructed from plain numbers), whitelisted functions and tensor methods; weights come
from safetensors. Branches and residual connections survive because the graph is kept whole.
"""

from __future__ import annotations

import builtins
import inspect
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from service.errors import BundleError, ModelError
from service.nn import Affine

FORMAT = "mcserve-fx/1"

MODULES: dict[str, type[nn.Module]] = {
    cls.__name__: cls
    for cls in (
        nn.Linear, nn.Bilinear, nn.Conv1d, nn.Conv2d, nn.Conv3d,
        nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm,
        nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU,
        nn.Softplus, nn.Mish, nn.Hardtanh, nn.Softmax, nn.LogSoftmax,
        nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
        nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Unflatten, nn.Identity,
        nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, Affine,
    )
}  # fmt: skip
FUNCTIONS: dict[str, Any] = {
    **{f"operator.{n}": getattr(operator, n) for n in (
        "add", "sub", "mul", "truediv", "neg", "getitem", "matmul", "pow")},
    **{f"torch.{n}": getattr(torch, n) for n in (
        "relu", "sigmoid", "tanh", "flatten", "cat", "stack", "softmax", "log_softmax", "exp",
        "log", "sum", "mean", "add", "mul", "matmul", "reshape", "squeeze", "unsqueeze",
        "clamp", "abs", "sqrt", "transpose", "permute", "where", "maximum", "minimum")},
    **{f"F.{n}": getattr(F, n) for n in (
        "relu", "gelu", "silu", "leaky_relu", "elu", "softplus", "softmax", "log_softmax",
        "linear", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "layer_norm", "normalize")},
    "builtins.getattr": builtins.getattr,
}  # fmt: skip
FUNCTION_NAMES = {id(v): k for k, v in FUNCTIONS.items()}
METHODS = {
    "view", "reshape", "flatten", "size", "relu", "sigmoid", "tanh", "mean", "sum", "unsqueeze",
    "squeeze", "permute", "transpose", "contiguous", "softmax", "log_softmax", "exp", "log", "add",
    "mul", "sub", "div", "clamp", "pow", "sqrt", "abs", "float", "chunk", "split", "expand",
}  # fmt: skip
ATTRIBUTES = {"shape", "ndim"}  # read through builtins.getattr
_SKIP_PARAMS = {"self", "device", "dtype", "inplace"}


def _ctor_args(name: str, module: nn.Module) -> dict[str, Any]:
    """Constructor keyword arguments read back from the module's own attributes."""
    out: dict[str, Any] = {}
    for p in inspect.signature(type(module).__init__).parameters.values():
        if p.name in _SKIP_PARAMS or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.name == "bias" and p.default is True:
            value: Any = getattr(module, "bias", None) is not None
        elif hasattr(module, p.name):
            value = getattr(module, p.name)
        elif p.default is inspect.Parameter.empty:
            raise ModelError(f"layer '{name}' ({type(module).__name__}) cannot be described")
        else:
            continue
        # Defaults are left out: a bundle then loads in an older torch whose constructor lacks
        # an argument added later with that default (BatchNorm's `bias`: torch 2.11 lacks it).
        if p.default is not inspect.Parameter.empty and _same(value, p.default):
            continue
        out[p.name] = _encode(value)
    return out


def _same(value: Any, default: Any) -> bool:
    try:
        return type(value) is type(default) and bool(value == default)
    except Exception:  # tensors and other values without a plain truth value
        return False


def _encode(v: Any) -> Any:
    if isinstance(v, fx.Node):
        return {"node": v.name}
    if isinstance(v, tuple):
        return {"tuple": [_encode(x) for x in v]}
    if isinstance(v, list):
        return [_encode(x) for x in v]
    if isinstance(v, dict):
        return {"dict": {str(k): _encode(x) for k, x in v.items()}}
    if isinstance(v, slice):
        return {"slice": [_encode(v.start), _encode(v.stop), _encode(v.step)]}
    if v is Ellipsis:
        return {"ellipsis": True}
    if isinstance(v, torch.dtype):
        return {"dtype": str(v).removeprefix("torch.")}
    if isinstance(v, torch.Size):
        return {"tuple": list(v)}
    if v is None or isinstance(v, bool | int | float | str):
        return v
    raise ModelError(f"cannot describe the value {v!r} ({type(v).__name__}) in the graph")


def _decode(v: Any, env: dict[str, fx.Node]) -> Any:
    if isinstance(v, list):
        return [_decode(x, env) for x in v]
    if isinstance(v, dict):
        if "node" in v:
            return env[v["node"]]
        if "tuple" in v:
            return tuple(_decode(x, env) for x in v["tuple"])
        if "dict" in v:
            return {k: _decode(x, env) for k, x in v["dict"].items()}
        if "slice" in v:
            return slice(*(_decode(x, env) for x in v["slice"]))
        if "ellipsis" in v:
            return Ellipsis
        if "dtype" in v:
            dt = getattr(torch, str(v["dtype"]), None)
            if not isinstance(dt, torch.dtype):
                raise BundleError(f"unknown dtype {v['dtype']!r}")
            return dt
        raise BundleError(f"unknown value encoding {sorted(v)}")
    return v


def describe(gm: fx.GraphModule) -> dict[str, Any]:
    """JSON description of a traced module; refuses anything outside the whitelist."""
    modules: dict[str, Any] = {}
    nodes = []
    for n in gm.graph.nodes:
        target: Any = n.target
        if n.op == "call_module":
            sub = gm.get_submodule(n.target)
            cls = type(sub).__name__
            if MODULES.get(cls) is not type(sub):
                raise ModelError(f"layer '{n.target}' of type {cls} is not supported in a bundle")
            modules[n.target] = {"type": cls, "args": _ctor_args(n.target, sub)}
        elif n.op == "call_function":
            target = FUNCTION_NAMES.get(id(n.target))
            if target is None:
                raise ModelError(f"function {n.target} at node '{n.name}' is not supported")
            if target == "builtins.getattr" and n.args[1] not in ATTRIBUTES:
                raise ModelError(f"attribute access '{n.args[1]}' at node '{n.name}'")
        elif n.op == "call_method" and n.target not in METHODS:
            raise ModelError(f"tensor method '{n.target}' at node '{n.name}' is not supported")
        nodes.append(
            {
                "name": n.name,
                "op": n.op,
                "target": target,
                "args": _encode(tuple(n.args))["tuple"],
                "kwargs": {k: _encode(v) for k, v in n.kwargs.items()},
            }
        )
    return {"format": FORMAT, "modules": modules, "nodes": nodes}


def rebuild(desc: dict[str, Any], state: dict[str, torch.Tensor]) -> fx.GraphModule:
    """Rebuild the module from its description and load `state` (strict: every key must match)."""
    if desc.get("format") != FORMAT:
        raise BundleError(f"unknown architecture format {desc.get('format')!r}, expected {FORMAT}")
    root: dict[str, Any] = {}
    for qual, spec in desc["modules"].items():
        cls = MODULES.get(spec["type"])
        if cls is None:
            raise BundleError(f"layer type {spec['type']!r} is not allowed")
        kwargs = {k: _decode(v, {}) for k, v in spec["args"].items()}
        try:
            root[qual] = cls(**kwargs)
        except TypeError as exc:
            raise BundleError(f"layer '{qual}': bad arguments ({exc})") from exc
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    for nd in desc["nodes"]:
        op, target = nd["op"], nd["target"]
        args = tuple(_decode(nd["args"], env))
        kwargs = {k: _decode(v, env) for k, v in nd["kwargs"].items()}
        if op == "placeholder":
            node = graph.placeholder(target)
        elif op == "output":
            node = graph.output(args[0])
        elif op == "call_module":
            if target not in root:
                raise BundleError(f"node '{nd['name']}' calls unknown layer '{target}'")
            node = graph.call_module(target, args, kwargs)
        elif op == "call_function":
            if target not in FUNCTIONS:
                raise BundleError(f"function {target!r} is not allowed")
            node = graph.call_function(FUNCTIONS[target], args, kwargs)
        elif op == "call_method":
            if target not in METHODS:
                raise BundleError(f"tensor method {target!r} is not allowed")
            node = graph.call_method(target, args, kwargs)
        elif op == "get_attr":
            if target not in state:
                raise BundleError(f"node '{nd['name']}' reads '{target}', absent from the weights")
            root.setdefault(target, nn.Parameter(state[target].clone(), requires_grad=False))
            node = graph.get_attr(target)
        else:
            raise BundleError(f"unknown node kind {op!r}")
        env[nd["name"]] = node
    gm = fx.GraphModule(root, graph)
    try:
        gm.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BundleError(f"the weights do not fit the architecture: {exc}") from exc
    return gm.eval()
