"""Split a traced model into a deterministic prefix and a stochastic suffix.

The prefix holds every node that no dropout can reach: it runs once per input. The suffix holds
the dropout layers and everything downstream; it runs once per (pass, input) row, with each
dropout replaced by a multiplication with a mask fed from outside (see `masks.py`). The split is
read from the traced graph (torch.fx), so branches and residual connections are handled without a
list of known layers: a residual input that skips the dropout is a prefix value the suffix uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import fx, nn

from service.engine import dataflow
from service.engine.blocks import Layout, row_layout
from service.engine.fused import MaskRows, apply_mask
from service.engine.masks import KeepRule
from service.errors import ModelError
from service.nn import VariationalDropout

DROPOUT_MODULES: tuple[type[nn.Module], ...] = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
)
UNSUPPORTED_MODULES: tuple[type[nn.Module], ...] = (nn.AlphaDropout, nn.FeatureAlphaDropout)
FUNCTIONAL_DROPOUT: tuple[Any, ...] = (
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    F.alpha_dropout,
    F.feature_alpha_dropout,
    torch.dropout,
    torch.alpha_dropout,
    torch.feature_dropout,
    torch.feature_alpha_dropout,
)


@dataclass(frozen=True)
class DropoutSite:
    """One dropout layer of the suffix; `mask_shape` excludes the row dimension."""

    name: str
    rule: KeepRule
    # Elementwise: the input's shape; channel dropout: (C, 1, ...); shared over time (a
    # VariationalDropout on [B, L, *features]): (1, *features), one mask per sequence.
    mask_shape: tuple[int, ...]
    shared_over: Literal["time"] | None = None  # "time": broadcast over the input's axis 1

    @property
    def features(self) -> int:
        return math.prod(self.mask_shape)


@dataclass
class SplitGraph:
    prefix: fx.GraphModule  # input -> tuple of frontier tensors
    suffix: fx.GraphModule  # (*frontier rows, *keep masks) -> output rows
    frontier_batched: tuple[bool, ...]  # False: a batch-independent tensor passed as is
    # Per frontier tensor: the dropout site that is its only use in the suffix, else None. The
    # fused mask kernel can read such a tensor's rows in place instead of a gathered copy.
    frontier_site: tuple[int | None, ...]
    sites: tuple[DropoutSite, ...]
    output_shape: tuple[int, ...]  # per row
    # Graph-order index of the first sampled site among all the model's sites: the masks of
    # site i are keyed by first_site + i, so a site draws the same masks whichever setting runs.
    first_site: int = 0
    # Where each linear layer's input holds the batch (blocks.row_layout), by node name.
    linear_rows: Layout = field(default_factory=dict)


def apply_keep(x: torch.Tensor, keep: torch.Tensor | MaskRows, scale: float) -> torch.Tensor:
    """Inverted dropout with a keep mask (0/1 floats or bools, broadcastable to x), or with the
    counters of one (`MaskRows`: masks made and applied in one pass, see fused.py)."""
    if isinstance(keep, MaskRows):
        return apply_mask(x, keep, scale)
    # One temporary and an in-place scale: measured 35 % faster than x * keep * scale.
    return x.mul(keep).mul_(scale)


torch.fx.wrap("apply_keep")


class LeafTracer(fx.Tracer):
    """fx's tracer with mcserve's VariationalDropout a leaf, like torch's own dropout modules:
    traced through in eval mode it is the identity, and its site would vanish from the graph."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, VariationalDropout) or super().is_leaf_module(m, module_qualified_name)


def shared_mask_shape(name: str, shape: tuple[int, ...], example: torch.Tensor) -> tuple[int, ...]:
    """The mask of a site shared over time: (1, *features) for an input [B, L, *features].

    Axis 1 must be the sequence's time axis: the tensor needs one (rank 3 or more), and for token
    ids [B, L] its size must be the input's length L, which catches a transposed tensor ([B,
    features, L]) or attention weights ([B, heads, L, S]). Float features ([B, mels, frames]
    audio) do not say which of their axes is time: there axis 1 must be the size of one of the
    input's axes (a speech model's frames-first [B, frames, mels] was refused for not having the
    mels' size), which still catches channels from a convolution ([B, C, frames])."""
    fix = (
        "VariationalDropout shares its mask over axis 1 of a batch-first [B, L, features] "
        "tensor: put it on one (e.g. the embeddings or an RNN's outputs), or use nn.Dropout"
    )
    if len(shape) < 2:
        raise ModelError(
            f"dropout site '{name}' is shared over time but its input "
            f"{['B', *shape]} has no time axis; {fix}"
        )
    if example.dim() >= 2 and not example.dtype.is_floating_point:  # token ids [B, L]
        if shape[0] != example.shape[1]:
            raise ModelError(
                f"dropout site '{name}' is shared over time but axis 1 of its input "
                f"{['B', *shape]} has size {shape[0]}, not the input's length "
                f"{example.shape[1]}; {fix}"
            )
    elif example.dim() >= 2 and shape[0] not in example.shape[1:]:
        raise ModelError(
            f"dropout site '{name}' is shared over time but axis 1 of its input "
            f"{['B', *shape]} has size {shape[0]}, none of the input's sizes "
            f"{list(example.shape[1:])} (channels, not time?); {fix} (a time axis the model "
            "shortens, as a strided convolution does, cannot be shared over: use nn.Dropout)"
        )
    return (1, *shape[1:])


def trace(module: nn.Module) -> fx.GraphModule:
    try:
        tracer = LeafTracer()
        graph = tracer.trace(module)
        return fx.GraphModule(tracer.root, graph, type(module).__name__)
    except Exception as exc:  # tracing errors come in many types; all mean the same to users
        raise ModelError(
            f"the model cannot be traced by torch.fx ({type(exc).__name__}: {exc}); "
            "data-dependent Python control flow in forward() is not supported"
        ) from exc


def find_dropout(gm: fx.GraphModule) -> list[fx.Node]:
    """Dropout modules of the graph; refuses dropout the engine could not switch on by itself."""
    sites = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            sub = gm.get_submodule(node.target)
            if isinstance(sub, UNSUPPORTED_MODULES):
                raise ModelError(
                    f"{type(sub).__name__} at '{node.target}' is not supported; use nn.Dropout"
                )
            if isinstance(sub, DROPOUT_MODULES) and float(sub.p) > 0:  # type: ignore[arg-type]
                sites.append(node)
        elif (node.op == "call_function" and node.target in FUNCTIONAL_DROPOUT) or (
            node.op == "call_method" and "dropout" in str(node.target)
        ):
            raise ModelError(_functional_dropout(node))
    return sites


def _functional_dropout(node: fx.Node) -> str:
    """Where functional dropout came from: the innermost module in whose forward it ran."""
    path, cls = [("", None), *(node.meta.get("nn_module_stack") or {}).values()][-1]
    where = f"in layer '{path}' ({cls.__name__})" if isinstance(cls, type) else "in forward()"
    if isinstance(cls, type) and issubclass(cls, nn.Dropout):  # its forward is its own
        return (
            f"dropout {where}: {cls.__name__} subclasses nn.Dropout but overrides forward(), "
            "which a bundle cannot reproduce; keep nn.Dropout's forward (or use nn.Dropout)"
        )
    return (
        f"functional dropout at node '{node.name}' {where} follows the module's training "
        "flag, which MC sampling cannot switch on alone; replace it with an nn.Dropout module"
    )


def _index(v: Any) -> bool:
    return isinstance(v, torch.Tensor) and not v.dtype.is_floating_point


def split(
    module: nn.Module,
    example: torch.Tensor,
    *,
    use_prefix: bool = True,
    sampled: int | None = None,
) -> SplitGraph:
    """Trace `module` (already in eval mode) and split it; `example` is [B, *input_shape].

    `sampled`: sample only the last k dropout sites in graph order (None: all). The earlier
    ones are taken out of the graph (eval-mode dropout is the identity), so the values they
    fed become deterministic and join the prefix: for a head-only setting, the whole trunk."""
    gm = trace(module)
    dataflow.check_in_place(gm)
    drop_nodes = find_dropout(gm)
    if not drop_nodes:
        raise ModelError("the model has no dropout layer with p > 0, so MC dropout has no effect")
    first = 0
    if sampled is not None:
        if not 1 <= sampled <= len(drop_nodes):
            raise ModelError(
                f"the last {sampled} dropout sites were asked for; the model has {len(drop_nodes)}"
            )
        first = len(drop_nodes) - sampled
        for n in drop_nodes[:first]:
            n.replace_all_uses_with(n.args[0])  # type: ignore[arg-type]
            gm.graph.erase_node(n)
        gm.recompile()
        drop_nodes = drop_nodes[first:]
    # Two batch sizes tell batched values (leading dim follows the batch) from the rest.
    ex2, ex3 = example[:1].expand(2, *example.shape[1:]), example[:1].expand(3, *example.shape[1:])
    v2, v3 = dataflow.values(gm, ex2.contiguous()), dataflow.values(gm, ex3.contiguous())
    v3x = dataflow.first_values(gm, dataflow.perturbed(ex3.contiguous()))  # which rows are whose
    # Index values made from sizes (an arange(B)), recomputed after the dropout; float ones
    # (a learned query expanded to the batch) are the same for every input: carried over.
    sizes = {n for n in dataflow.size_only(gm) if _index(v2.get(n))}

    def batched(n: fx.Node) -> bool:
        a, b = v2.get(n), v3.get(n)
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dim() > 0
            and a.shape[0] == 2
            and b.shape[0] == 3
        )

    nodes = list(gm.graph.nodes)
    output = next(n for n in nodes if n.op == "output")
    stochastic: set[fx.Node] = set()
    if use_prefix:
        for n in nodes:
            if n in drop_nodes or any(a in stochastic for a in n.all_input_nodes):
                stochastic.add(n)
    else:
        stochastic = {n for n in nodes if n.op not in ("placeholder", "output")}
    stochastic.discard(output)
    out_arg = output.args[0]
    if not isinstance(out_arg, fx.Node) or out_arg not in stochastic:
        raise ModelError("the model's output does not depend on any dropout layer")
    # A non-batched value (a size, a constant tensor) used by the suffix is recomputed there,
    # and so is a batched one made from sizes alone (an arange(B): the suffix's rows are passes
    # x inputs); it stays in the prefix too when the prefix uses it (a length read by both).
    core = set(stochastic)
    changed = True
    while changed:
        changed = False
        for n in nodes:
            if n in stochastic or n.op in ("output", "placeholder"):
                continue
            if any(u in stochastic for u in n.users) and (not batched(n) or n in sizes):
                stochastic.add(n)
                changed = True
    recomputed = stochastic - core
    frontier = [
        n
        for n in nodes
        if n not in stochastic and n.op != "output" and any(u in stochastic for u in n.users)
    ]
    for n in frontier:
        if not isinstance(v2[n], torch.Tensor):
            raise ModelError(f"node '{n.name}' feeds the dropout part but is not a tensor")

    prefix_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in nodes:
        if (n in stochastic and n not in recomputed) or n.op == "output":
            continue
        env[n] = prefix_graph.node_copy(n, lambda a: env[a])
    prefix_graph.output(tuple(env[n] for n in frontier))
    prefix = fx.GraphModule(gm, prefix_graph)
    if recomputed and prefix.graph.eliminate_dead_code():  # recomputed values it does not use
        prefix.recompile()

    suffix_graph = fx.Graph()
    senv: dict[fx.Node, fx.Node] = {}
    for n in frontier:
        senv[n] = suffix_graph.placeholder(f"frontier_{n.name}")
    sites: list[DropoutSite] = []
    keep_inputs = [suffix_graph.placeholder(f"keep_{i}") for i in range(len(drop_nodes))]
    for n in nodes:
        if n not in stochastic:
            continue
        if n in drop_nodes:
            idx = drop_nodes.index(n)
            sub = gm.get_submodule(str(n.target))
            src = n.args[0]
            assert isinstance(src, fx.Node)
            a, b = v2[src].shape, v3[src].shape  # a [1, ...] table broadcasts over the rows
            if not batched(src) and not (a[:1] == b[:1] == (1,) and a == b):  # masks fail
                raise ModelError(
                    f"dropout site '{n.target}' ({type(sub).__name__}) is on a tensor whose "
                    f"first dimension is not the batch (shape {list(v2[src].shape)} for a batch "
                    "of 2: a seq-first [L, B, D] activation, a position table or a weight); "
                    "apply it to a batch-first tensor (transpose first, or drop after the "
                    "table is added to the batch's activations)"
                )
            dataflow.check_channel_dropout(sub, str(n.target), v2[src])
            shape = tuple(v2[src].shape[1:])
            shared = None
            if isinstance(sub, VariationalDropout):
                shared = sub.shared_over
                mask_shape = shared_mask_shape(str(n.target), shape, example)
            elif type(sub) is nn.Dropout:
                mask_shape = shape
            else:  # channel dropout (Dropout1d/2d/3d) zeroes whole channels: a byte per channel
                mask_shape = (shape[0],) + (1,) * (len(shape) - 1)
            rule = KeepRule(float(sub.p))  # type: ignore[arg-type]
            rule.validate(str(n.target))
            sites.append(DropoutSite(str(n.target), rule, mask_shape, shared))
            senv[n] = suffix_graph.call_function(
                apply_keep, (senv[src], keep_inputs[idx], rule.scale)
            )
        else:
            senv[n] = suffix_graph.node_copy(n, lambda a: senv[a])
    suffix_graph.output(senv[out_arg])

    def only_dropout(n: fx.Node) -> int | None:
        users = [u for u in n.users if u in stochastic]
        if len(users) == 1 and users[0] in drop_nodes and users[0].args[0] is n:
            return drop_nodes.index(users[0])
        return None

    order = [drop_nodes.index(n) for n in nodes if n in drop_nodes]
    assert order == sorted(order)
    out_shape = tuple(v2[out_arg].shape[1:])
    return SplitGraph(
        prefix=prefix,
        suffix=fx.GraphModule(gm, suffix_graph),
        frontier_batched=tuple(batched(n) for n in frontier),
        frontier_site=tuple(only_dropout(n) if batched(n) else None for n in frontier),
        sites=tuple(sites),
        output_shape=out_shape,
        first_site=first,
        linear_rows=row_layout(gm, v2, v3, v3x),
    )
