"""What a bundle's ONNX graph may compute, checked before onnxruntime sees it.

The ONNX graph serves the deterministic answers and is not derived from the checked
architecture at load, so its own cost needs bounds. A reviewer's graphs, each a few kB: a Loop
of 2**62 iterations (every deterministic request, and the compute process's warm-up, hung), and a
ConstantOfShape of 2**28 floats that onnxruntime folded at session creation (2.5 GB at load; at
2**34, every request failed). Refused here:

- control flow (a node holding a subgraph: If, Loop, Scan) and model-local functions, which
  mcserve's exporter never writes;
- operators outside the standard ONNX domain (com.microsoft's and other contributed ones);
- random operators (a deterministic answer that is random is no answer), a Dropout among them
  unless its training_mode is absent or a constant false;
- an operator that makes a tensor of a size taken from values (ConstantOfShape, Expand, Tile,
  Range, ...) unless ONNX shape inference, propagating constants, bounds every dimension by a
  number or by the input's own dimensions;
- any tensor whose size inference cannot bound by numbers and the input's own dimensions,
  unless its operator keeps its input's size (a Reshape, an activation: `SAME_SIZE`; a Reshape
  to [-1, 1] then hid an outer product of the batch's values, 17 GB at 1,024 inputs), or
  whose size (a broadcast of [B, 1000, 1] by [B, 1, 1000], say) is over the limit per instance,
  or holds the batch dimension twice; the batch is the dimension of the graph's one input that
  is not an initializer;
- a sparse tensor declaring more values than the limit (onnxruntime makes it dense).

Not closed (docs/BUNDLES.md): inference believes the shapes a graph declares for its
intermediate tensors (`value_info`), which the exporter writes and which are needed to follow
Range and Expand; a graph that lies there, about a size it computes from values inference
cannot follow, passes. The direction that closes it: derive the ONNX graph from the checked
architecture instead of reading it from the bundle.
"""

from __future__ import annotations

import ast
import math

import onnx
import onnx.numpy_helper
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
    "ImageDecoder", "AffineGrid",
}  # fmt: skip
STANDARD_DOMAINS = {"", "ai.onnx"}
# Operators whose outputs have (at most) their first input's number of values.
SAME_SIZE = {
    "Reshape", "Identity", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Cast", "CastLike",
    "Relu", "LeakyRelu", "Elu", "Selu", "Gelu", "Sigmoid", "HardSigmoid", "Tanh", "Softplus",
    "Softsign", "Mish", "HardSwish", "Erf", "Exp", "Log", "Neg", "Abs", "Sqrt", "Reciprocal",
    "Sign", "Floor", "Ceil", "Round", "Not", "Softmax", "LogSoftmax", "Dropout", "Clip",
    "LayerNormalization", "Slice", "Split",
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
        if node.domain not in STANDARD_DOMAINS:
            raise BundleError(
                f"{where}: {name} ({node.op_type}) is of the operator domain "
                f"'{node.domain[:60]}'; bundles hold standard ONNX operators only"
            )
        if node.op_type in RANDOM or (node.op_type == "Dropout" and _training(node, model)):
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


def _training(node: onnx.NodeProto, model: onnx.ModelProto) -> bool:
    """Whether a Dropout may be in training mode: onnxruntime keeps such a node (its optimiser
    removes inference-mode ones), and it drops units at random in every answer."""
    if len(node.input) < 3 or not node.input[2]:
        return False  # no training_mode: inference
    init = next((t for t in model.graph.initializer if t.name == node.input[2]), None)
    if init is None:  # a Constant node's value, else computed: may be true
        made = next((n for n in model.graph.node if node.input[2] in n.output), None)
        value = [a.t for a in made.attribute if a.name == "value"] if made is not None else []
        if made is None or made.op_type != "Constant" or not value:
            return True
        init = value[0]
    return bool(onnx.numpy_helper.to_array(init).any())


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
    batch, bounded = _input_dims(model, input_shape, where)
    for out, op in sized:  # these must be bounded: their size comes from values
        if _bounds(_dims(known.get(out)), bounded, batch) is None:
            raise BundleError(
                f"{where}: the size of {op} output '{out}' cannot be bounded before it runs "
                "(it comes from values shape inference cannot follow)"
            )
    # Per tensor, the most values it holds per instance and whether its size may hold the
    # batch. Inference sizes most tensors; the rest are bounded by their inputs: an operator
    # that keeps its input's size (a Reshape: the exporter's LSTM graphs reshape to a size
    # inference cannot name), or one with a single input whose size may hold the batch (the
    # others constants or sizes: a Gemm of an older exporter, whose output dimensions it names
    # itself), at most the product of its inputs' sizes. Two such inputs and an unknown size
    # (a Reshape to [-1, 1] hid an outer product of the batch's values, 17 GB at 1,024
    # inputs) is refused. Nodes come in topological order (ONNX requires it).
    size: dict[str, tuple[float, bool]] = {}
    for init in model.graph.initializer:
        size[init.name] = (math.prod(init.dims), False)
    for i in model.graph.input:
        if i.name not in size:
            size[i.name] = (math.prod(input_shape), True)
    for node in model.graph.node:
        ins = [size.get(i, (math.inf, True)) for i in node.input if i]
        for name in (out for out in node.output if out):
            sizes = _bounds(_dims(known.get(name)), bounded, batch)
            if sizes is not None:
                if sum(b for _, b in sizes) > 1:
                    raise BundleError(
                        f"{where}: tensor '{name[:80]}' grows with the square of the batch; a "
                        "model's cost must be linear in its batch"
                    )
                most = float(math.prod(m for m, _ in sizes))
                size[name] = (most, any(b for _, b in sizes))
            elif node.op_type in SAME_SIZE and ins:
                most = ins[0][0]
                size[name] = ins[0]
            elif sum(grows for _, grows in ins) <= 1 and node.op_type not in SIZED_BY_VALUES:
                most = math.prod(m for m, _ in ins)
                size[name] = (most, any(grows for _, grows in ins))
            else:
                raise BundleError(
                    f"{where}: the size of tensor '{name[:80]}' ({node.op_type}) cannot be "
                    "bounded before it runs (ONNX shape inference cannot follow it, and more "
                    "than one of its inputs may hold the batch); export with save() "
                    "(torch.onnx.export(dynamo=True)), whose graphs inference sizes"
                )
            if most > max_elements:
                raise BundleError(
                    f"{where}: tensor '{name[:80]}' holds {most:.0f} values per instance, over "
                    f"the limit of {max_elements}"
                )


def _bounds(
    dims: list[onnx.TensorShapeProto.Dimension] | None, bounded: dict[str, int], batch: str
) -> list[tuple[int, int]] | None:
    """Per dimension, the most it holds for one instance and how often the batch enters it;
    None when a dimension has no bound. A named dimension may be an expression inference
    wrote of bounded names (a convolution's 'length - 2')."""
    if dims is None:
        return None
    out = []
    for d in dims:
        if d.HasField("dim_value"):
            out.append((d.dim_value, 0))
            continue
        try:
            tree = ast.parse(d.dim_param, mode="eval").body
        except (SyntaxError, ValueError, RecursionError, MemoryError):  # not an expression
            return None
        most = _most(tree, bounded)
        if most is None or not math.isfinite(most):
            return None
        uses = sum(isinstance(n, ast.Name) and n.id == batch for n in ast.walk(tree))
        out.append((math.ceil(most), uses if batch else 0))
    return out


def _most(node: ast.expr, bounded: dict[str, int]) -> float | None:
    """The largest value of a dimension expression (torch's exporter writes sympy's forms:
    `length - 2`, `Min(12, length)`, `floor(length/2)`) of names, each at most its bound, and
    whole numbers; None for anything else. Dimensions are >= 0, so a - b is at most a."""
    if isinstance(node, ast.Name):
        return bounded.get(node.id)
    if isinstance(node, ast.Constant) and type(node.value) is int and node.value >= 0:
        return node.value
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.keywords:
        args = [_most(a, bounded) for a in node.args]
        known = [a for a in args if a is not None]
        if node.func.id == "Min" and known:
            return min(known)  # at most any one bounded argument
        if not args or len(known) < len(args):
            return None
        if node.func.id == "Max":
            return max(known)
        if node.func.id in ("floor", "FloorToInt", "ceiling", "CeilToInt") and len(args) == 1:
            return math.ceil(known[0])
        if node.func.id == "Mod" and len(args) == 2 and isinstance(node.args[1], ast.Constant):
            return min(known[0], max(known[1] - 1, 0))
        return None
    if not isinstance(node, ast.BinOp):
        return None
    left, right = _most(node.left, bounded), _most(node.right, bounded)
    if left is None or right is None:
        return None
    if isinstance(node.op, ast.Add):
        return left + right
    if isinstance(node.op, ast.Sub):
        return left
    if isinstance(node.op, ast.Mult):
        return left * right
    by_number = isinstance(node.right, ast.Constant) and right > 0
    if isinstance(node.op, ast.FloorDiv | ast.Div) and by_number:
        return left / right
    if isinstance(node.op, ast.Mod) and by_number:
        return min(left, right - 1)
    return None


def _dims(info: onnx.ValueInfoProto | None) -> list[onnx.TensorShapeProto.Dimension] | None:
    if info is None or not info.type.tensor_type.HasField("shape"):
        return None
    return list(info.type.tensor_type.shape.dim)


def _input_dims(
    model: onnx.ModelProto, input_shape: list[int], where: str
) -> tuple[str, dict[str, int]]:
    """The input's batch dimension's name, and every named input dimension with the most it
    counts for one instance: 1 for the batch, the manifest's size for another (a text's length
    axis with buckets: max_tokens). Inference names other unknown dimensions itself
    ("unk__0"); those bound nothing."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]  # a constant first
    # (onnxruntime still sees one input) hid the batch, and with it the square-of-batch check
    if len(inputs) != 1:
        raise BundleError(f"{where}: the ONNX graph must take one input, it takes {len(inputs)}")
    dims = list(inputs[0].type.tensor_type.shape.dim)
    batch = dims[0].dim_param if dims else ""
    bounded = {batch: 1} if batch else {}
    for d, most in zip(dims[1:], input_shape, strict=False):
        if d.dim_param and d.dim_param != batch:
            bounded[d.dim_param] = int(most)
    return batch, bounded
