"""The ONNX graph's own cost is bounded before onnxruntime sees it (service/bundle/onnx_graph.py):
a reviewer's few-kB graphs hung every deterministic request (a Loop of 2**62 iterations) or made
onnxruntime fold gigabytes at session creation (ConstantOfShape)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from hostile import repin
from onnx import TensorProto, helper, numpy_helper

from service.bundle import load_bundle
from service.bundle.onnx_graph import check_graph
from service.errors import BundleError

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 100_000_000


def _model(nodes: list[onnx.NodeProto], inits: list[TensorProto] | None = None) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)], inits or [],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def _const(name: str, values: list[int]) -> TensorProto:
    return numpy_helper.from_array(np.array(values, dtype=np.int64), name)


def _loop() -> onnx.ModelProto:
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond"], ["cond_out"])], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, [])],
    )  # fmt: skip
    trips, yes = _const("trips", [2**62]), numpy_helper.from_array(np.array(True), "yes")
    return _model(
        [helper.make_node("Loop", ["trips", "yes"], [], body=body),
         helper.make_node("Identity", ["input"], ["output"])],
        [trips, yes],
    )  # fmt: skip


def _filled(shape_source: list[onnx.NodeProto], inits: list[TensorProto]) -> onnx.ModelProto:
    """output = input + sum(ConstantOfShape(shape))."""
    return _model(
        [*shape_source,
         helper.make_node("ConstantOfShape", ["shape"], ["big"]),
         helper.make_node("ReduceSum", ["big"], ["total"], keepdims=0),
         helper.make_node("Add", ["input", "total"], ["output"])],
        inits,
    )  # fmt: skip


CASES = {
    "loop": (_loop(), "holds a subgraph; control flow (If, Loop, Scan) can run without bound"),
    "constant-shape": (
        _filled([helper.make_node("Constant", [], ["shape"], value=_const("dims", [2**28]))], []),
        "tensor 'big' holds 268435456 values per instance, over the limit",
    ),
    "computed-shape": (  # a shape from values inference cannot follow (a sum of a constant)
        _filled(
            [helper.make_node("ReduceSum", ["parts"], ["total_dims"], keepdims=1),
             helper.make_node("Identity", ["total_dims"], ["shape"])],
            [_const("parts", [2**14, 2**14])],
        ),
        "the size of ConstantOfShape output 'big' cannot be bounded before it runs",
    ),
    "random": (
        _model([helper.make_node("RandomNormalLike", ["input"], ["output"])]),
        "(RandomNormalLike) is random; answers must repeat",
    ),
    # A Dropout in training mode: onnxruntime keeps it (its optimiser removes inference-mode
    # ones), and with ratio 1e-4 the probe's tolerance let it through; 7 of 1,000 rows then
    # differed between two identical requests.
    "training-dropout": (
        _model([helper.make_node("Dropout", ["input", "ratio", "yes"], ["output"])],
               [numpy_helper.from_array(np.array(1e-4, np.float32), "ratio"),
                numpy_helper.from_array(np.array(True), "yes")]),
        "(Dropout) is random; answers must repeat",
    ),
    "computed-training-dropout": (  # training_mode not a constant: may be true
        _model([helper.make_node("ReduceMax", ["input"], ["m"], keepdims=0),
                helper.make_node("Cast", ["m"], ["flag"], to=TensorProto.BOOL),
                helper.make_node("Dropout", ["input", "", "flag"], ["output"])]),
        "(Dropout) is random; answers must repeat",
    ),
    "contributed-domain": (  # com.microsoft's operators loaded; any domain a build may add
        _model([helper.make_node("Gelu", ["input"], ["output"], domain="com.microsoft")]),
        "(Gelu) is of the operator domain 'com.microsoft'; bundles hold standard ONNX operators",
    ),
    "affine-grid": (  # its size comes from a value input: was not in the list
        _model([helper.make_node("ReduceMax", ["input"], ["m"], keepdims=0),
                helper.make_node("Cast", ["m"], ["n"], to=TensorProto.INT64),
                helper.make_node("Unsqueeze", ["n", "a0"], ["n1"]),
                helper.make_node("Concat", ["one4", "n1", "n1"], ["size"], axis=0),
                helper.make_node("AffineGrid", ["theta", "size"], ["grid"]),
                helper.make_node("ReduceSum", ["grid"], ["total"], keepdims=0),
                helper.make_node("Add", ["input", "total"], ["output"])],
               [_const("a0", [0]), _const("one4", [1, 1]),
                numpy_helper.from_array(np.eye(2, 3, dtype=np.float32)[None], "theta")]),
        "the size of AffineGrid output 'grid' cannot be bounded before it runs",
    ),
    # A Reshape to [-1, 1] hides the batch from inference: the outer product of every value of
    # the batch with every other then loaded (quadratic: about 17 GB at 1,024 inputs).
    "hidden-batch": (
        _model([helper.make_node("Reshape", ["input", "col"], ["xf"]),
                helper.make_node("Transpose", ["xf"], ["xt"]),
                helper.make_node("MatMul", ["xf", "xt"], ["gram"]),
                helper.make_node("ReduceSum", ["gram"], ["total"], keepdims=0),
                helper.make_node("Add", ["input", "total"], ["output"])],
               [_const("col", [-1, 1])]),
        "the size of tensor 'gram' (MatMul) cannot be bounded before it runs",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_a_graph_whose_cost_has_no_bound_is_refused(case: str) -> None:
    model, message = CASES[case]
    with pytest.raises(BundleError) as e:
        check_graph(model, "model.onnx", LIMIT, [4])
    assert message in e.value.message


def test_a_sparse_tensor_declaring_too_many_values_is_refused() -> None:
    values = numpy_helper.from_array(np.ones(1, np.float32), "v")
    sparse = helper.make_sparse_tensor(values, _const("i", [0]), [2**40])
    model = _model([helper.make_node("Identity", ["input"], ["output"])])
    model.graph.sparse_initializer.append(sparse)
    with pytest.raises(BundleError, match="a sparse tensor declares 1099511627776 values"):
        check_graph(model, "model.onnx", LIMIT, [4])


def test_the_batch_dimension_and_inputs_sizes_pass() -> None:
    """The exporter's own pattern: a table of zeros [batch, n] shaped from the input."""
    model = _model(
        [helper.make_node("Shape", ["input"], ["in_shape"], end=1),
         helper.make_node("Concat", ["in_shape", "width"], ["shape"], axis=0),
         helper.make_node("ConstantOfShape", ["shape"], ["zeros"]),
         helper.make_node("Add", ["input", "zeros"], ["output"])],
        [_const("width", [4])],
    )  # fmt: skip
    check_graph(model, "model.onnx", LIMIT, [4])  # no BundleError


def test_a_bundle_with_a_loop_is_refused_at_load(tmp_path: Path) -> None:
    bundle = tmp_path / "diabetes" / "1"
    shutil.copytree(ROOT / "models" / "diabetes" / "1", bundle)
    model = onnx.load(str(bundle / "model.onnx"))
    loop = _loop()
    model.graph.initializer.extend(loop.graph.initializer)
    model.graph.node.insert(0, loop.graph.node[0])
    onnx.save(model, str(bundle / "model.onnx"))
    repin(bundle, "model.onnx")
    with pytest.raises(BundleError) as e:
        load_bundle(bundle)
    assert e.value.message.startswith(f"{bundle}/model.onnx: node '")
    assert "(Loop) holds a subgraph" in e.value.message


def _broadcast(second: str) -> onnx.ModelProto:
    """[B, 1000, 1] times [B, 1, 1000] (inference knows the product's size), then for
    "square" once more after a reshape to [B, 1e6]: 1e12 values per instance, no listed op."""
    unsq = [_const("a1", [1]), _const("a2", [2]), _const("flat", [0, -1]), _const("a12", [1, 2])]
    nodes = [
        helper.make_node("Unsqueeze", ["input", "a2"], ["c"]),
        helper.make_node("Unsqueeze", ["input", "a1"], ["r"]),
        helper.make_node("Mul", ["c", "r"], ["sq"]),
    ]
    last = "sq"
    if second == "square":
        nodes += [
            helper.make_node("Reshape", ["sq", "flat"], ["f"]),
            helper.make_node("Unsqueeze", ["f", "a2"], ["c2"]),
            helper.make_node("Unsqueeze", ["f", "a1"], ["r2"]),
            helper.make_node("Mul", ["c2", "r2"], ["q"]),
        ]
        last = "q"
    nodes.append(helper.make_node("ReduceSum", [last, "a12"], ["output"], keepdims=0))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1000])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)], unsq,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def test_any_tensor_inference_can_size_is_bounded() -> None:
    check_graph(_broadcast("once"), "model.onnx", LIMIT, [1000])  # 1e6 per instance: fine
    with pytest.raises(BundleError, match="tensor 'q' holds 1000000000000 values per instance"):
        check_graph(_broadcast("square"), "model.onnx", LIMIT, [1000])


def test_the_batch_twice_is_refused() -> None:
    with pytest.raises(BundleError, match="tensor 'big' grows with the square of the batch"):
        check_graph(_expand_batch_twice(), "model.onnx", LIMIT, [4])


def test_a_graph_without_a_named_batch_is_not_called_quadratic() -> None:
    """With no named batch dimension, every unnamed dimension counted as "the batch": a [2, 4]
    Relu was refused as growing with the batch squared."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["input"], ["output"])], "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)],
    )  # fmt: skip
    check_graph(helper.make_model(graph), "model.onnx", LIMIT, [4])  # no BundleError


def _expand_batch_twice() -> onnx.ModelProto:
    """Expand to [batch, batch, 10]: fine at batch 1, 100 x at batch 10 (the size(0)**2 hole)."""
    return _model(
        [helper.make_node("Shape", ["input"], ["b"], end=1),
         helper.make_node("Concat", ["b", "b", "ten"], ["shape"], axis=0),
         helper.make_node("Expand", ["one", "shape"], ["big"]),
         helper.make_node("ReduceSum", ["big", "a12"], ["total"], keepdims=0),
         helper.make_node("Unsqueeze", ["total", "a1"], ["col"]),
         helper.make_node("Add", ["input", "col"], ["output"])],
        [_const("ten", [10]), numpy_helper.from_array(np.ones(1, np.float32), "one"),
         _const("a12", [1, 2]), _const("a1", [1])],
    )  # fmt: skip


def test_a_constant_listed_first_does_not_hide_the_batch() -> None:
    """graph.input[0] was taken as the batch input: a constant (an initializer, which
    onnxruntime does not count as an input) listed first turned the square check off; the
    batch is the one input that is not an initializer."""
    model = _expand_batch_twice()
    model.graph.input.insert(0, helper.make_tensor_value_info("ten", TensorProto.INT64, [1]))
    with pytest.raises(BundleError, match="tensor 'big' grows with the square of the batch"):
        check_graph(model, "model.onnx", LIMIT, [4])
    plain = _model([helper.make_node("Add", ["input", "one"], ["output"])],
                   [numpy_helper.from_array(np.ones(1, np.float32), "one")])  # fmt: skip
    plain.graph.input.insert(0, helper.make_tensor_value_info("one", TensorProto.FLOAT, [1]))
    check_graph(plain, "model.onnx", LIMIT, [4])  # an initializer listed as an input: fine
    two = _model([helper.make_node("Add", ["input", "other"], ["output"])])
    two.graph.input.append(helper.make_tensor_value_info("other", TensorProto.FLOAT, ["b", 4]))
    with pytest.raises(BundleError, match="the ONNX graph must take one input, it takes 2"):
        check_graph(two, "model.onnx", LIMIT, [4])


def test_an_inference_mode_dropout_passes() -> None:
    """torch's eval-mode exports write no training_mode; a constant false is inference too."""
    for inputs, inits in (
        (["input"], []),
        (["input", "", "no"], [numpy_helper.from_array(np.array(False), "no")]),
    ):
        model = _model([helper.make_node("Dropout", inputs, ["output"])], inits)
        check_graph(model, "model.onnx", LIMIT, [4])  # no BundleError
    false = numpy_helper.from_array(np.array(False), "f")  # a Constant node's false: as well
    model = _model([helper.make_node("Constant", [], ["no"], value=false),
                    helper.make_node("Dropout", ["input", "", "no"], ["output"])])  # fmt: skip
    check_graph(model, "model.onnx", LIMIT, [4])


@pytest.mark.parametrize(
    ("dims", "want"),
    [
        (["batch", "length - 2", 8], [(1, 1), (900, 0), (8, 0)]),  # a convolution's output
        (["2*length + 1", "length//2"], [(1801, 0), (450, 0)]),
        (["Min(12, length)", "Min(12, unk__0)", "Max(1, length)"], [(12, 0), (12, 0), (900, 0)]),
        (["floor(length/7)", "ceiling(length/7)", "Mod(length, 5)"], [(129, 0), (129, 0), (4, 0)]),
        (["Max(1, unk__0)"], None),
        (["open(length)"], None),
        (["batch*batch"], [(1, 2)]),  # counted twice: refused as quadratic
        (["unk__0"], None),  # a name inference made up bounds nothing
        (["length - unk__1"], None),
        (["length ** 2"], None),
        (["(" * 500 + "length" + ")" * 500], None),  # too deep for the parser: no bound
    ],
)
def test_dimension_expressions_are_bounded_by_their_names(
    dims: list[str | int], want: list[tuple[int, int]] | None
) -> None:
    from service.bundle.onnx_graph import _bounds

    shape = helper.make_tensor_type_proto(TensorProto.FLOAT, dims).tensor_type.shape
    assert _bounds(list(shape.dim), {"batch": 1, "length": 900}, "batch") == want


class _Legacy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = torch.nn.LSTM(4, 8, batch_first=True)
        self.fc = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.lstm(x)[0].mean(1))


def test_an_older_exporters_graph_with_dimensions_it_named_itself_passes(tmp_path: Path) -> None:
    """torch.onnx.export(dynamo=False) names output dimensions itself ('Gemmoutput_dim_0'),
    which inference cannot bound; a node with one input that may hold the batch (the others
    constants or sizes) is bounded by its inputs (such graphs were refused as unbounded)."""
    import contextlib
    import io
    import warnings

    path = tmp_path / "legacy.onnx"
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _Legacy().eval(), (torch.randn(2, 5, 4),), str(path), input_names=["input"],
            output_names=["output"], dynamic_axes={"input": {0: "batch", 1: "length"}},
            opset_version=17, dynamo=False,
        )  # fmt: skip
    check_graph(onnx.load(str(path)), "model.onnx", LIMIT, [5, 4])  # no BundleError
