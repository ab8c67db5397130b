"""What a bundle's ONNX graph may compute, checked before onnxruntime sees it.

The ONNX graph serves the deterministic answers and is not derived from the checked
architecture at load, so its own cost needs bounds. A reviewer's graphs, each a few kB: a Loop
of 2**62 iterations (every deterministic request, and the compute process's warm-up, hung), and a
ConstantOfShape of 2**28 floats that onnxruntime folded at session creation (2.5 GB at load; at
2**34, every request failed). Refused here:

- control flow (a node holding a subgraph: If, Loop, Scan) and model-local functions, which
  mcserve's exporter never writes;
- random operators (a deterministic answer that is random is no answer);
- an operator that makes a tensor of a size taken from values (ConstantOfShape, Expand, Tile,
  Range, ...) unless ONNX shape inference, propagating constants, bounds every dimension by a
  number or by the input's own dimensions, and the numbers multiply to at most the limit;
- a sparse tensor declaring more values than the limit (onnxruntime makes it dense).
"""

from __future__ import annotations

import math

import onnx
from onnx import shape_inference

from service.errors import BundleError

RANDOM = {
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
    "Bernoulli",
}  # fmt: skip
# Operators whose output size comes from an input's values or an attribute, not its inputs' sizes.
SIZED_BY_VALUES = {
    "ConstantOfShape", "Expand", "Tile", "Range", "Pad", "Resize", "Upsample", "OneHot",
    "EyeLike", "CenterCropPad", "Col2Im", "ConvTranspose", "MaxUnpool", "RoiAlign", "MaxRoiPool",
    "HannWindow", "HammingWindow", "BlackmanWindow", "MelWeightMatrix", "DFT", "STFT",
    "ImageDecoder",
}  # fmt: skip
_SUBGRAPHS = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)


def check_graph(model: onnx.ModelProto, where: str, max_elements: int) -> None:
    """Refuse a graph whose cost cannot be bounded before it runs (BundleError)."""
    if len(model.functions):
        raise BundleError(
            f"{where}: the graph defines {len(model.functions)} functions; bundles hold plain "
            "graphs (mcserve's exporter inlines them)"
        )
    sized: list[tuple[str, str]] = []
    for node in model.graph.node:
        name = f"node '{node.name or (node.output[0] if node.output else node.op_type)}'"
        if any(a.type in _SUBGRAPHS for a in node.attribute):
            raise BundleError(
                f"{where}: {name} ({node.op_type}) holds a subgraph; control flow (If, Loop, "
                "Scan) can run without bound and is not served"
            )
        if node.op_type in RANDOM:
            raise BundleError(f"{where}: {name} ({node.op_type}) is random; answers must repeat")
        if node.op_type in SIZED_BY_VALUES:
            sized.extend((out, node.op_type) for out in node.output)
    for sparse in _sparse_tensors(model):
        if math.prod(sparse.dims) > max_elements:
            raise BundleError(
                f"{where}: a sparse tensor declares {math.prod(sparse.dims)} values, over the "
                f"limit of {max_elements}"
            )
    if sized:
        _check_sizes(model, sized, where, max_elements)


def _sparse_tensors(model: onnx.ModelProto) -> list[onnx.SparseTensorProto]:
    out = list(model.graph.sparse_initializer)
    for node in model.graph.node:
        for a in node.attribute:
            out.extend([a.sparse_tensor] if a.HasField("sparse_tensor") else a.sparse_tensors)
    return out


def _check_sizes(
    model: onnx.ModelProto, sized: list[tuple[str, str]], where: str, max_elements: int
) -> None:
    try:
        inferred = shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception as exc:  # onnx raises its own types for graphs it cannot follow
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise BundleError(f"{where}: ONNX shape inference fails ({first})") from exc
    known = {v.name: v for v in [*inferred.graph.value_info, *inferred.graph.output]}
    # Named dimensions of the inputs (the batch, a text's length); inference names any other
    # unknown dimension itself ("unk__0"), which bounds nothing.
    free = {d.dim_param for i in model.graph.input for d in i.type.tensor_type.shape.dim}
    free.discard("")
    for out, op in sized:
        info = known.get(out)
        shape = info.type.tensor_type.shape if info is not None else None
        dims = list(shape.dim) if shape is not None else []
        if (
            info is None
            or not info.type.tensor_type.HasField("shape")
            or not all(d.HasField("dim_value") or d.dim_param in free for d in dims)
        ):
            raise BundleError(
                f"{where}: the size of {op} output '{out}' cannot be bounded before it runs "
                "(it comes from values shape inference cannot follow)"
            )
        n = math.prod(d.dim_value for d in dims if d.HasField("dim_value"))
        if n > max_elements:
            raise BundleError(
                f"{where}: {op} output '{out}' holds {n} values per instance, over the limit of "
                f"{max_elements}"
            )
