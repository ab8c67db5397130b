"""A declarative architecture: the traced torch.fx graph as JSON, rebuilt from a whitelist.

Loading a bundle must not run code from the bundle. The graph names only whitelisted layer
classes (constructed from plain numbers), whitelisted functions and tensor methods; weights come
from safetensors. Branches and residual connections survive because the graph is kept whole.
"""

from __future__ import annotations

import builtins
import inspect
import json
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from service.bundle import unsupported
from service.bundle.activations import check_activations
from service.bundle.aliasing import check_inplace
from service.bundle.grammar import ArchitectureLimits, check_description, constructor_signature
from service.errors import BundleError, ModelError
from service.nn import Affine, VariationalDropout

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
        nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, Affine, VariationalDropout,
        # Sequence layers. Stacked LSTM/GRU with dropout and attention arrive here already made
        # explicit (service/bundle/sequence.py), so these hold no hidden dropout.
        nn.Embedding, nn.LSTM, nn.GRU,
    )
}  # fmt: skip
FUNCTIONS: dict[str, Any] = {
    **{f"operator.{n}": getattr(operator, n) for n in (
        "add", "sub", "mul", "truediv", "neg", "getitem", "matmul", "pow", "floordiv", "eq", "ne",
        "lt", "le", "gt", "ge", "invert", "and_", "or_")},
    **{f"torch.{n}": getattr(torch, n) for n in (
        "relu", "sigmoid", "tanh", "flatten", "cat", "stack", "softmax", "log_softmax", "exp",
        "log", "sum", "mean", "add", "mul", "matmul", "reshape", "squeeze", "unsqueeze",
        "clamp", "abs", "sqrt", "transpose", "permute", "where", "maximum", "minimum", "arange",
        "zeros_like", "ones_like", "amax", "logical_not", "masked_fill")},
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
    # Padding masks and pooling over time.
    "masked_fill", "eq", "ne", "lt", "le", "gt", "ge", "logical_not", "long", "bool", "to",
    "type_as", "max", "amax", "min", "cumsum", "unbind", "flip", "expand_as",
    # Counting token occurrences (a TF-IDF reader): a zeroed table, added into, read back.
    "new_zeros", "scatter_add", "gather",
}  # fmt: skip
ATTRIBUTES = {"shape", "ndim", "device", "dtype"}  # read through builtins.getattr
_SKIP_PARAMS = {"self", "device", "dtype", "inplace"}


def _ctor_args(name: str, module: nn.Module) -> dict[str, Any]:
    """Constructor keyword arguments read back from the module's own attributes."""
    out: dict[str, Any] = {}
    if isinstance(module, nn.RNNBase) and float(module.dropout) > 0 and module.num_layers > 1:
        # Its dropout lives in the fused kernel, where MC sampling cannot reach it.
        raise ModelError(f"layer '{name}': a stacked {type(module).__name__} with hidden dropout")
    for p in constructor_signature(type(module)).parameters.values():
        if p.name in _SKIP_PARAMS or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.name == "bias" and isinstance(getattr(module, "bias", None), bool):
            value: Any = module.bias
        elif p.name == "bias" and p.default is True:
            value = getattr(module, "bias", None) is not None
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
    check_inplace(gm)
    modules: dict[str, Any] = {}
    nodes = []
    for n in gm.graph.nodes:
        target: Any = n.target
        if n.op == "call_module":
            sub = gm.get_submodule(n.target)
            cls = type(sub).__name__
            if MODULES.get(cls) is not type(sub):
                raise ModelError(unsupported.layer(n.target, cls))
            modules[n.target] = {"type": cls, "args": _ctor_args(n.target, sub)}
        elif n.op == "call_function":
            target = FUNCTION_NAMES.get(id(n.target))
            if target is None:
                raise ModelError(unsupported.function(n))
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
    desc = {"format": FORMAT, "modules": modules, "nodes": nodes}
    try:
        check(json.loads(json.dumps(desc)), "the traced graph")
    except BundleError as exc:  # the writer's user gets a ModelError: their module is the cause
        raise ModelError(exc.message) from exc
    return desc


def check(
    desc: Any, where: str = "architecture.json", limits: ArchitectureLimits | None = None
) -> None:
    """The one grammar check, run by the writer (through `rebuild`) and by the loader."""
    check_description(
        desc,
        where=where,
        modules_allowed=MODULES,
        functions=FUNCTIONS,
        methods=METHODS,
        attributes=ATTRIBUTES,
        skip_params=_SKIP_PARAMS,
        limits=limits or ArchitectureLimits(),
    )


def rebuild(
    desc: Any,
    state: dict[str, torch.Tensor],
    *,
    where: str = "architecture.json",
    input_shape: list[int] | None = None,
    input_dtype: torch.dtype = torch.float32,
    limits: ArchitectureLimits | None = None,
) -> fx.GraphModule:
    """Rebuild the module from its description and load `state` (strict: every key must match).

    Nothing is allocated from the description's numbers: layers are built on the meta device,
    their shapes compared with the weights, and (given `input_shape`) the graph is run on a meta
    input to bound its activations; only then are the weights assigned.
    """
    limits = limits or ArchitectureLimits()
    if not isinstance(desc, dict) or desc.get("format") != FORMAT:
        got = desc.get("format") if isinstance(desc, dict) else None
        raise BundleError(f"{where}: unknown architecture format {got!r}, expected {FORMAT}")
    check(desc, where, limits)
    root: dict[str, Any] = {}
    with torch.device("meta"):
        for qual, spec in desc["modules"].items():
            kwargs = {k: _decode(v, {}) for k, v in spec["args"].items()}
            try:
                root[qual] = MODULES[spec["type"]](**kwargs)
            except (TypeError, ValueError, RuntimeError) as exc:
                raise BundleError(f"{where}: layer '{qual}': bad arguments ({exc})") from exc
        graph = _graph(desc, root, state, where)
    # eval before the meta run: BatchNorm(momentum=None) in train mode reads a meta counter
    gm = fx.GraphModule(root, graph).eval()
    _check_shapes(gm, state, where)
    if input_shape is not None:
        check_activations(gm, input_shape, input_dtype, where, limits)
    try:
        gm.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise BundleError(f"{where}: the weights do not fit the architecture: {exc}") from exc
    return gm.eval()


def _graph(
    desc: dict[str, Any], root: dict[str, Any], state: dict[str, torch.Tensor], where: str
) -> fx.Graph:
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    inputs = 0
    for nd in desc["nodes"]:
        op, target = nd["op"], nd["target"]
        args = tuple(_decode(nd["args"], env))
        kwargs = {k: _decode(v, env) for k, v in nd["kwargs"].items()}
        if op == "placeholder":
            # The forward's parameter names are ours, not the bundle's: nothing it says is
            # written into the generated source as a name.
            node = graph.placeholder("input" if inputs == 0 else f"input_{inputs}")
            inputs += 1
        elif op == "output":
            node = graph.output(args[0])
        elif op == "call_module":
            node = graph.call_module(target, args, kwargs)
        elif op == "call_function":
            node = graph.call_function(FUNCTIONS[target], args, kwargs)
        elif op == "call_method":
            node = graph.call_method(target, args, kwargs)
        else:  # get_attr
            if target not in state:
                raise BundleError(
                    f"{where}: node '{nd['name']}' reads '{target}', absent from the weights"
                )
            # The weights' dtype, not float32: an index buffer (int64) read by get_attr must
            # stay an integer through the meta run, or indexing with it fails there.
            held = state[target]
            empty = torch.empty(held.shape, dtype=held.dtype)
            root.setdefault(target, nn.Parameter(empty, requires_grad=False))
            node = graph.get_attr(target)
        env[nd["name"]] = node
    return graph


def _check_shapes(gm: fx.GraphModule, state: dict[str, torch.Tensor], where: str) -> None:
    """Every tensor the layers declare must be in the weights with the same shape and dtype."""
    want = dict(gm.state_dict(keep_vars=True))
    missing = sorted(set(want) - set(state))
    extra = sorted(set(state) - set(want))
    if missing or extra:
        raise BundleError(
            f"{where}: the weights do not fit the architecture (missing {missing[:5]}, "
            f"unexpected {extra[:5]})"
        )
    for k, t in want.items():
        if tuple(t.shape) != tuple(state[k].shape):
            raise BundleError(
                f"{where}: the weights do not fit the architecture: '{k}' is "
                f"{list(state[k].shape)} in the weights but {list(t.shape)} in the layers"
            )
        if t.dtype != state[k].dtype:  # assigned as stored, it failed later, blaming another file
            got, need = (str(d).removeprefix("torch.") for d in (state[k].dtype, t.dtype))
            raise BundleError(
                f"{where}: the weights do not fit the architecture: '{k}' is {got} in the weights "
                f"but {need} in the layers; save the weights as {need}"
            )
