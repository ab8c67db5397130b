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
  number or by the input's own dimensions;
- any tensor whose size inference knows (a broadcast of [B, 1000, 1] by [B, 1, 1000], say)
  over the limit per instance, or holding the batch dimension twice;
- a sparse tensor declaring more values than the limit (onnxruntime makes it dense).

Not closed (docs/BUNDLES.md): inference believes the shapes a graph declares for its
intermediate tensors (`value_info`), which the exporter writes and which are needed to follow
Range and Expand; a graph that lies there, about a size it computes from values inference
cannot follow, passes. The direction that closes it: derive the ONNX graph from the checked
architecture instead of reading it from the bundle.
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


def check_graph(
    model: onnx.ModelProto, where: str, max_elements: int, input_shape: list[int]
) -> None:
    """Refuse a graph whose cost cannot be bounded before it runs (BundleError).
    `input_shape`: one instance's shape (the manifest's), the most each named input
    dimension but the batch can be."""
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
    _check_sizes(model, sized, where, max_elements, input_shape)


def _sparse_tensors(model: onnx.ModelProto) -> list[onnx.SparseTensorProto]:
    out = list(model.graph.sparse_initializer)
    for node in model.graph.node:
        for a in node.attribute:
            out.extend([a.sparse_tensor] if a.HasField("sparse_tensor") else a.sparse_tensors)
    return out


def _check_sizes(
    model: onnx.ModelProto,
    sized: list[tuple[str, str]],
    where: str,
    max_elements: int,
    input_shape: list[int],
) -> None:
    try:
        inferred = shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception as exc:  # onnx raises its own types for graphs it cannot follow
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise BundleError(f"{where}: ONNX shape inference fails ({first})") from exc
    known = {v.name: v for v in [*inferred.graph.value_info, *inferred.graph.output]}
    batch, bounded = _input_dims(model, input_shape)
    for out, op in sized:  # these must be bounded: their size comes from values
        info = known.get(out)
        dims = _dims(info)
        if dims is None or not all(d.HasField("dim_value") or d.dim_param in bounded for d in dims):
            raise BundleError(
                f"{where}: the size of {op} output '{out}' cannot be bounded before it runs "
                "(it comes from values shape inference cannot follow)"
            )
    for name, info in known.items():  # every tensor whose size inference knows
        dims = _dims(info)
        if dims is None or not all(d.HasField("dim_value") or d.dim_param in bounded for d in dims):
            continue  # sized by its inputs, not known statically
        if batch and sum(d.dim_param == batch for d in dims) > 1:
            raise BundleError(
                f"{where}: tensor '{name}' grows with the square of the batch; a model's cost "
                "must be linear in its batch"
            )
        n = math.prod(
            d.dim_value if d.HasField("dim_value") else bounded[d.dim_param] for d in dims
        )
        if n > max_elements:
            raise BundleError(
                f"{where}: tensor '{name}' holds {n} values per instance, over the limit of "
                f"{max_elements}"
            )


def _dims(info: onnx.ValueInfoProto | None) -> list[onnx.TensorShapeProto.Dimension] | None:
    if info is None or not info.type.tensor_type.HasField("shape"):
        return None
    return list(info.type.tensor_type.shape.dim)


def _input_dims(model: onnx.ModelProto, input_shape: list[int]) -> tuple[str, dict[str, int]]:
    """The input's batch dimension's name, and every named input dimension with the most it
    counts for one instance: 1 for the batch, the manifest's size for another (a text's length
    axis with buckets: max_tokens). Inference names other unknown dimensions itself
    ("unk__0"); those bound nothing."""
    dims = list(model.graph.input[0].type.tensor_type.shape.dim) if model.graph.input else []
    batch = dims[0].dim_param if dims else ""
    bounded = {batch: 1} if batch else {}
    for d, most in zip(dims[1:], input_shape, strict=False):
        if d.dim_param and d.dim_param != batch:
            bounded[d.dim_param] = int(most)
    return batch, bounded
