"""The ONNX graph (mode=deterministic) must compute what the rebuilt torch module computes: a
graph with 5 output columns for a 1-output regressor served 5 means, one with 3 logits for 2
labels a 3-class softmax. Checked at load on a small probe input (onnx_predictor.disagreement)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from service.bundle import load_bundle
from service.bundle.spec import InputSpec, TextInput
from service.engine.model import ServedModel
from service.engine.onnx_predictor import probe_input
from service.errors import BundleError

ROOT = Path(__file__).resolve().parents[2]


def repin(bundle: Path, name: str) -> None:
    mf = bundle / "manifest.json"
    data = json.loads(mf.read_text())
    raw = (bundle / name).read_bytes()
    data["artifacts"][name] |= {"sha256": hashlib.sha256(raw).hexdigest(), "size": len(raw)}
    mf.write_text(json.dumps(data))


def _copy(tmp_path: Path, source: str) -> Path:
    dest = tmp_path / source
    shutil.copytree(ROOT / "models" / source, dest)
    return dest


def _matmul_graph(bundle: Path, n_in: int, n_out: int, dtype: int = TensorProto.FLOAT) -> None:
    """The reviewer's graph: input @ W, W [n_in, n_out]."""
    w = np.ones((n_in, n_out), np.float32) * np.arange(n_out, dtype=np.float32)
    x = "input" if dtype == TensorProto.FLOAT else "x"
    nodes = [helper.make_node("MatMul", [x, "W"], ["output"])]
    if dtype != TensorProto.FLOAT:
        nodes.insert(0, helper.make_node("Cast", ["input"], ["x"], to=TensorProto.FLOAT))
    g = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input", dtype, ["batch", n_in])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", n_out])],
        [numpy_helper.from_array(w, "W")],
    )  # fmt: skip
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)])
    m.ir_version = 9
    onnx.save(m, str(bundle / "model.onnx"))
    repin(bundle, "model.onnx")


@pytest.mark.parametrize(
    ("source", "n_in", "n_out", "torch_out"),
    [("breast-cancer/1", 30, 3, 2), ("diabetes/1", 10, 5, 1)],
    ids=["3-logits-for-2-labels", "5-columns-for-1-output"],
)
def test_a_graph_of_another_output_shape_is_refused(
    tmp_path: Path, source: str, n_in: int, n_out: int, torch_out: int
) -> None:
    bundle = _copy(tmp_path, source)
    _matmul_graph(bundle, n_in, n_out)
    with pytest.raises(BundleError) as e:
        ServedModel(load_bundle(bundle))
    assert e.value.message == (
        f"{bundle}/model.onnx: the ONNX graph (the deterministic path) is not the bundle's "
        f"model: it outputs [2, {n_out}] for the probe input [2, {n_in}], the architecture and "
        f"weights [2, {torch_out}]; export it again from the same module and weights (save() "
        "does)"
    )


def test_a_graph_with_other_weights_is_refused(tmp_path: Path) -> None:
    bundle = _copy(tmp_path, "diabetes/1")
    model = onnx.load(str(bundle / "model.onnx"))
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.01, init.name))
    onnx.save(model, str(bundle / "model.onnx"))
    repin(bundle, "model.onnx")
    with pytest.raises(BundleError) as e:
        ServedModel(load_bundle(bundle))
    assert e.value.message.startswith(
        f"{bundle}/model.onnx: the ONNX graph (the deterministic path) is not the bundle's "
        "model: its outputs differ from the architecture and weights' by up to "
    )
    assert e.value.message.endswith(
        " on a probe input (tolerance 0.001 relative, 0.0001 absolute); export it again from "
        "the same module and weights (save() does)"
    )


def test_a_graph_of_another_input_type_is_refused(tmp_path: Path) -> None:
    bundle = _copy(tmp_path, "diabetes/1")
    _matmul_graph(bundle, 10, 1, dtype=TensorProto.DOUBLE)
    with pytest.raises(BundleError) as e:
        ServedModel(load_bundle(bundle))
    assert e.value.message == (
        f"{bundle}/model.onnx: the ONNX graph (the deterministic path) is not the bundle's "
        "model: its input is tensor(double), but the manifest's inputs.dtype is float32; "
        "export it again from the same module and weights (save() does)"
    )


def test_the_probe_input_keeps_to_the_manifest() -> None:
    spec = InputSpec(
        shape=[4],
        valid_ranges=[(0, 1), (-5, 5), (2, float("inf")), (float("-inf"), -3)],
        training_ranges=[(0.2, 0.4), (-1, 1), (2, 3), (-10, -4)],
    )
    x = probe_input(spec)
    assert x.shape == (2, 4) and x.dtype == np.float32
    lo, hi = np.array(spec.training_ranges).T  # type: ignore[arg-type]
    assert (x >= lo).all() and (x <= hi).all() and not np.array_equal(x[0], x[1])
    opened = probe_input(InputSpec(shape=[2], valid_ranges=[(2, float("inf")), (-9, -3)]))
    assert (opened[:, 0] >= 2).all() and (opened[:, 1] <= -3).all() and (opened[:, 1] >= -9).all()
    text = TextInput(tokenizer="tokenizer.json", max_tokens=8)
    ids = probe_input(InputSpec(dtype="int64", shape=[8], value_range=(0, 3), text=text))
    assert ids.dtype == np.int64 and ids.min() >= 1 and ids.max() <= 3


def _plus_constant(bundle: Path, rows: int) -> None:
    """The reviewer's graph: the model's logits plus a [rows, 10] zero constant: right at
    `rows` inputs, `rows` answers for 1 input, an onnxruntime error for 3."""
    model = onnx.load(str(bundle / "model.onnx"))
    out = model.graph.output[0].name
    for node in model.graph.node:
        node.output[:] = ["logits" if o == out else o for o in node.output]
    zeros = numpy_helper.from_array(np.zeros((rows, 10), np.float32), "zeros")
    model.graph.initializer.append(zeros)
    model.graph.node.append(helper.make_node("Add", ["logits", "zeros"], [out]))
    onnx.save(model, str(bundle / "model.onnx"))
    repin(bundle, "model.onnx")


def test_a_graph_right_at_one_batch_size_only_is_refused(tmp_path: Path) -> None:
    """Probed at 2 rows only, it loaded: 1 instance got 2 predictions, 3 a 500."""
    bundle = _copy(tmp_path, "digits/2")
    _plus_constant(bundle, 2)
    with pytest.raises(BundleError) as e:
        ServedModel(load_bundle(bundle))
    assert "it outputs [2, 10] for the probe input [1, 1, 8, 8]" in e.value.message


def test_a_graph_failing_or_answering_other_rows_is_a_model_error(tmp_path: Path) -> None:
    """What a graph does at serving time is the model's fault, said so (an onnxruntime error was
    a 500 counted as an internal error; a [2, K] answer for 1 input was served)."""
    from service.engine.onnx_predictor import OnnxPredictor
    from service.errors import ModelError

    bundle = _copy(tmp_path, "digits/2")
    _plus_constant(bundle, 2)
    onnx_ = OnnxPredictor(bundle / "model.onnx")
    x = np.zeros((1, 1, 8, 8), np.float32)
    with pytest.raises(ModelError, match=r"answered \[2, 10\] for 1 inputs; a model answers one"):
        onnx_.predict(x)
    with pytest.raises(ModelError, match="the ONNX graph failed on 3 inputs"):
        onnx_.predict(np.zeros((3, 1, 8, 8), np.float32))
    assert onnx_.predict(np.zeros((2, 1, 8, 8), np.float32)).shape == (2, 10)
