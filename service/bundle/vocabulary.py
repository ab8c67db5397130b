"""A token model's vocabulary: the rows of the embedding that reads its input ids.

An id at or past those rows is no token: torch's embedding raises (a 500 for every text that
holds it) and ONNX Runtime's Gather refuses it. So a bundle's ids, from its tokenizer or sent
directly within `inputs.value_range`, must all have a row; checked at load and by `save`.
"""

from __future__ import annotations

from typing import Any

from torch import fx, nn

from service.bundle.tokenizer import largest_id
from service.errors import BundleError


def embedding_rows(gm: nn.Module) -> tuple[str, int] | None:
    """The layer name and rows of the smallest nn.Embedding that reads the input ids directly
    (None when none does: a module that is not a traced graph, or no embedding reads them)."""
    if not isinstance(gm, fx.GraphModule):
        return None
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"][:1]
    found = [
        (str(n.target), int(m.num_embeddings))
        for n in gm.graph.nodes
        if n.op == "call_module"
        and isinstance(m := gm.get_submodule(str(n.target)), nn.Embedding)
        and list(n.args[:1]) == inputs
    ]
    return min(found, key=lambda f: f[1]) if found else None


def check_vocabulary(
    module: nn.Module,
    value_range: tuple[float, float] | None,
    tokenizer: Any,
    pad_id: int | None,
    where: str,
    tokenizer_where: str = "the tokenizer",
) -> None:
    """Refuse ids a bundle can make or accept that its embedding has no row for (BundleError):
    `where` names the manifest, `tokenizer_where` the tokenizer's file."""
    rows = embedding_rows(module)
    if rows is None:
        return
    layer, n = rows
    fix = f"the embedding '{layer}' has {n} rows (ids 0..{n - 1})"
    if value_range is not None and not 0 <= value_range[0] <= value_range[1] < n:
        raise BundleError(
            f"{where}: inputs.value_range [{value_range[0]:g}, {value_range[1]:g}] holds ids "
            f"the model has no row for; {fix}: give a range within it"
        )
    if tokenizer is None:
        return
    top = largest_id(tokenizer)
    if top >= n:
        raise BundleError(
            f"{tokenizer_where}: makes ids up to {top} but {fix}; package the model with "
            "the tokenizer it was trained with (or an embedding as large as its vocabulary)"
        )
    if pad_id is not None and pad_id >= n:
        raise BundleError(f"{where}: inputs.text.pad_id {pad_id} has no row; {fix}")
