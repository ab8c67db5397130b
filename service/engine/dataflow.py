"""What a traced model's values depend on, read before it is split (graph.py).

- `perturbed`: the example of 3 inputs with the last input's values changed. Each node's value
  on it, set against its value on three copies of input 0, says which of its rows follow which
  input: the linear layers' row blocks are tied to inputs that way (blocks.row_layout), not by
  shapes alone (a Siamese model's torch.cat([x[:, 0], x[:, 1]]) holds 2B rows, B of them per
  half: blocks of 2 rows per input took zeros for most of them);
- `size_only`: values computed from the input's sizes, not its values (torch.arange(B), zeros
  of [B, d]): the integer ones (indices) are recomputed in the suffix from its own rows, never
  gathered from the prefix's (an arange(B) of the prefix indexed the suffix's pass x input rows
  with the prefix's row numbers: last-token pooling served one pass's row for every pass); the
  float ones, the same for every input, are carried over (graph.py);
- `check_in_place`: an in-place operation whose input is read elsewhere is refused: the split
  runs the whole prefix before the suffix, so a dropout branch that read the value before the
  in-place change would read it after (bundles are rebuilt without `inplace`; a module given to
  the sampler directly is not);
- `check_channel_dropout`: Dropout1d on [B, F] and Dropout3d on [B, C, H, W] are unbatched
  inputs to torch, which zeroes whole inputs there; refused rather than served with other
  masks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from service.bundle.aliasing import inplace_node, reads_metadata
from service.errors import ModelError

# The rank each channel dropout needs for a batched input (torch reads one rank less as one
# unbatched input); Dropout2d's 3-D input is read as batched by torch 2.x.
_CHANNEL_RANK = {nn.Dropout1d: 3, nn.Dropout3d: 5}


def values(gm: fx.GraphModule, x: torch.Tensor) -> dict[fx.Node, Any]:
    """Every node's value for input x (an interpreter that keeps all intermediate values)."""
    values: dict[fx.Node, Any] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            values[n] = out
            return out

    with torch.inference_mode():
        Recorder(gm).run(x)
    return values


def first_values(gm: fx.GraphModule, inputs: list[torch.Tensor]) -> dict[fx.Node, Any]:
    """The values for the first of `inputs` the model runs on ({} if none: a model that indexes
    by token ids may refuse one)."""
    for x in inputs:
        try:
            return values(gm, x)
        except Exception:
            continue
    return {}


def perturbed(example3: torch.Tensor) -> list[torch.Tensor]:
    """Candidates for the 3-input example with input 2 changed, in order of preference."""
    x = example3.clone()
    if x.dtype.is_floating_point:
        x[2] = x[2] + 0.5
        return [x]
    shifted, rolled = x.clone(), x.clone()
    shifted[2] = shifted[2] + 1  # token ids one up: in any vocabulary of 2 or more
    rolled[2] = torch.roll(rolled[2], 1, dims=-1)
    return [shifted, rolled]


def size_only(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes whose value does not depend on the input's values (only on its sizes, on weights
    and on constants)."""
    content: set[fx.Node] = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            content.add(n)
        elif reads_metadata(n) or _shaped_like(n):
            continue
        elif any(a in content for a in n.all_input_nodes):
            content.add(n)
    return {n for n in gm.graph.nodes if n not in content and n.op not in ("output", "get_attr")}


# Tensors made to the shape of another, whose values they do not read.
_LIKE_METHODS = {"new_zeros", "new_ones", "new_full"}
_LIKE_FUNCTIONS = {torch.zeros_like, torch.ones_like, torch.full_like}


def _shaped_like(n: fx.Node) -> bool:
    return (n.op == "call_method" and n.target in _LIKE_METHODS) or (
        n.op == "call_function" and n.target in _LIKE_FUNCTIONS
    )


def check_in_place(gm: fx.GraphModule) -> None:
    for n in gm.graph.nodes:
        src = n.args[0] if n.args else None
        if not isinstance(src, fx.Node):
            continue
        readers = [u.name for u in src.users if u is not n and not reads_metadata(u)]
        method = n.op == "call_method" and str(n.target).endswith("_")
        if readers and (method or inplace_node(gm, n)):
            raise ModelError(
                f"node '{n.name}' changes '{src.name}' in place, which {readers[:5]} read too: "
                "MC sampling runs the model's parts in another order; compute out of place "
                "(inplace=False), as a bundle does"
            )


def check_channel_dropout(sub: nn.Module, target: str, value: Any) -> None:
    rank = next((r for cls, r in _CHANNEL_RANK.items() if type(sub) is cls), None)
    if rank is not None and isinstance(value, torch.Tensor) and value.dim() != rank:
        raise ModelError(
            f"dropout site '{target}' ({type(sub).__name__}) is on a {value.dim()}-D tensor "
            f"(shape {list(value.shape)} for a batch of 2); torch reads it as unbatched and "
            f"zeroes whole inputs, it wants {rank}-D [B, C, ...]: use nn.Dropout for "
            "per-feature dropout, or give it the batched shape"
        )
