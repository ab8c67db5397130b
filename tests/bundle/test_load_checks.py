"""Load refusals found by review: the bundle's memory bound over all artifacts, `data`
artifacts no tensor reads, weights that are not finite (safetensors and ONNX), non-finite and
deeply nested manifest values, and a tokenizer.json of the wrong shape. Each message names the
file and the field or tensor."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from hostile import edit_json, repin
from onnx import numpy_helper
from safetensors.numpy import load_file, save_file

from service.bundle import TrustPolicy, load_bundle
from service.errors import BundleError

ROOT = Path(__file__).resolve().parents[2]


def _copy(tmp_path: Path, source: str) -> Path:
    dest = tmp_path / source
    shutil.copytree(ROOT / "models" / source, dest)
    return dest


@pytest.fixture()
def bundle(tmp_path: Path) -> Path:
    return _copy(tmp_path, "diabetes/1")


def _external(bundle: Path, location: str = "weights.bin") -> None:
    """The ONNX graph's weights moved to a listed, hashed `data` artifact."""
    model = onnx.load(str(bundle / "model.onnx"))
    onnx.save_model(
        model, str(bundle / "model.onnx"), save_as_external_data=True, location=location,
        size_threshold=0,
    )  # fmt: skip
    repin(bundle, "model.onnx")
    repin(bundle, location, role="data")


def test_the_artifacts_together_are_bounded_before_any_is_read(bundle: Path) -> None:
    """Hard links to one file, each under max_artifact_bytes: the reviewer's 12 x 200 MiB took
    2.7 GB. Their sum is refused from their sizes, before a byte of them is read."""
    _external(bundle)
    for i in range(3):
        os.link(bundle / "weights.bin", bundle / f"copy{i}.bin")
        repin(bundle, f"copy{i}.bin", role="data")
    sizes = sum(f.stat().st_size for f in bundle.iterdir() if f.name != "manifest.json")
    with pytest.raises(BundleError) as e:
        load_bundle(bundle, TrustPolicy(max_bundle_bytes=sizes - 1))
    assert e.value.message == (
        f"{bundle}/manifest.json: its 7 artifacts hold {sizes} bytes together, over the limit of "
        f"{sizes - 1} (setting max_bundle_bytes); remove artifacts the model does not use, or "
        "raise the setting for this model directory"
    )


def test_a_data_artifact_no_tensor_reads_is_refused(bundle: Path) -> None:
    _external(bundle)
    assert load_bundle(bundle).onnx_bytes  # the graph's own external data loads
    shutil.copy(bundle / "weights.bin", bundle / "spare.bin")
    repin(bundle, "spare.bin", role="data")
    with pytest.raises(BundleError) as e:
        load_bundle(bundle)
    assert e.value.message == (
        f"{bundle}/spare.bin: a 'data' artifact that no tensor of the ONNX graph reads; remove it "
        "and its entry from manifest.json's artifacts (role 'data' is the graph's external data, "
        "nothing else)"
    )


def test_a_data_artifact_without_a_graph_is_refused(bundle: Path) -> None:
    (bundle / "blob.bin").write_bytes(b"\0" * 64)
    repin(bundle, "blob.bin", role="data")
    edit_json(bundle / "manifest.json", lambda d: d["artifacts"].pop("model.onnx"))
    with pytest.raises(BundleError, match=r"/blob.bin: a 'data' artifact that no tensor"):
        load_bundle(bundle)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_weight_that_is_not_finite_is_refused_by_name(bundle: Path, value: float) -> None:
    state = load_file(str(bundle / "weights.safetensors"))
    state["7.weight"] = state["7.weight"].copy()
    state["7.weight"].flat[3] = value
    save_file(state, str(bundle / "weights.safetensors"))
    repin(bundle, "weights.safetensors")
    with pytest.raises(BundleError) as e:
        load_bundle(bundle)
    n = state["7.weight"].size
    assert e.value.message == (
        f"{bundle}/weights.safetensors: tensor '7.weight' holds {value} (1 of its {n} values are "
        "not finite); a model's weights are finite numbers: check the training run that made "
        "them (a diverged loss) and package weights from before it"
    )


@pytest.mark.parametrize("dtype", ["float64", "float16", "int64"])
def test_a_weight_of_another_dtype_is_refused_by_name(bundle: Path, dtype: str) -> None:
    """It was assigned as stored and failed later, blaming model.onnx ("export it again") or
    the input shape, or dumped load_state_dict's message."""
    state = load_file(str(bundle / "weights.safetensors"))
    state["7.weight"] = state["7.weight"].astype(dtype)
    save_file(state, str(bundle / "weights.safetensors"))
    repin(bundle, "weights.safetensors")
    with pytest.raises(BundleError) as e:
        load_bundle(bundle)
    assert e.value.message.endswith(
        f"the weights do not fit the architecture: '7.weight' is {dtype} in the weights but "
        "float32 in the layers; save the weights as float32"
    )


def test_an_onnx_weight_that_is_not_finite_is_refused_by_name(bundle: Path) -> None:
    model = onnx.load(str(bundle / "model.onnx"))
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    values = numpy_helper.to_array(init).copy()
    values.flat[0] = np.nan
    init.CopyFrom(numpy_helper.from_array(values, init.name))
    onnx.save_model(model, str(bundle / "model.onnx"))
    repin(bundle, "model.onnx")
    with pytest.raises(BundleError) as e:
        load_bundle(bundle)
    assert e.value.message == (
        f"{bundle}/model.onnx: tensor '{init.name}' holds nan (1 of its {values.size} values are "
        "NaN); a served graph's weights are numbers: fix the weights and export "
        "the graph again"
    )


def _set(path: str, value: Any) -> Any:
    def change(d: dict[str, Any]) -> None:
        *parents, leaf = path.split(".")
        for p in parents:
            d = d[p]
        d[leaf] = value

    return change


@pytest.mark.parametrize(
    ("source", "path", "expected"),
    [
        (
            "diabetes/1",
            "aleatoric.noise_var",
            "invalid manifest at 'aleatoric.noise_var': Input should be a finite number "
            "(Infinity and NaN are not numbers a manifest may hold)",
        ),
        (
            "breast-cancer/2",
            "calibration.temperature",
            "invalid manifest at 'calibration': Value error, calibration.temperature must be a "
            "finite number > 0 (got inf); calibrate again (`service calibrate`)",
        ),
        (
            "breast-cancer/2",
            "calibration.temperature_fit.nll",
            "invalid manifest at 'calibration': Value error, calibration.temperature_fit.nll is "
            "inf; the fit's record holds finite numbers (a fit that diverged writes no "
            "calibration)",
        ),
        (
            "breast-cancer/2",
            "referral.epistemic",
            "invalid manifest at 'referral.epistemic': Input should be a finite number "
            "(Infinity and NaN are not numbers a manifest may hold)",
        ),
        (
            "diabetes/1",
            "training.metrics.rmse",
            "invalid manifest at 'training.metrics.rmse': Input should be a finite number "
            "(Infinity and NaN are not numbers a manifest may hold)",
        ),
        (
            "diabetes/1",
            "training.provenance.loss",
            "'training.provenance.loss' is inf; a manifest's numbers are finite: write a finite "
            "value, or a string if it is a note",
        ),
    ],
    ids=["noise_var", "temperature", "temperature_fit", "referral", "metrics", "provenance"],
)
def test_a_manifest_number_that_is_not_finite_is_refused(
    tmp_path: Path, source: str, path: str, expected: str
) -> None:
    """json reads `Infinity`: an infinite temperature answered 0.5 for every class on the
    deterministic path and a 500 on the MC path; an infinite noise_var likewise."""
    bundle = _copy(tmp_path, source)
    edit_json(bundle / "manifest.json", _set(path, float("inf")))
    with pytest.raises(BundleError) as e:
        load_bundle(bundle)
    assert e.value.message == f"{bundle}/manifest.json: {expected}"


def test_a_default_no_server_can_run_is_refused(bundle: Path) -> None:
    """defaults.samples = 10**15 loaded as ready, and every request relying on it was refused."""
    from service.engine.masks import MAX_PASSES

    edit_json(bundle / "manifest.json", _set("defaults.samples", MAX_PASSES))
    with pytest.raises(BundleError) as e:
        load_bundle(bundle)
    assert e.value.message == (
        f"{bundle}/manifest.json: invalid manifest at 'defaults.samples': Input should be less "
        f"than or equal to {MAX_PASSES - 1}"
    )
    edit_json(bundle / "manifest.json", _set("defaults.samples", MAX_PASSES - 1))
    assert load_bundle(bundle).manifest.defaults.samples == MAX_PASSES - 1


def test_an_open_range_still_loads(bundle: Path) -> None:
    """A range may be open on one side ([lo, Infinity]): that is a meaning, not an error."""
    raw = json.loads((bundle / "manifest.json").read_text())["inputs"]["valid_ranges"]
    edit_json(bundle / "manifest.json", _set("inputs.valid_ranges", [[0, float("inf")], *raw[1:]]))
    ranges = load_bundle(bundle).manifest.inputs.valid_ranges or []
    assert ranges[0] == (0.0, float("inf"))


def test_free_form_sections_nested_too_deep_are_refused(bundle: Path) -> None:
    """Nested 300 deep, a provenance loaded and every GET /v1/models/<name> was a 500."""
    deep: Any = "x"
    for _ in range(300):
        deep = {"a": deep}
    edit_json(bundle / "manifest.json", _set("training.provenance.note", deep))
    with pytest.raises(BundleError) as e:
        load_bundle(bundle)
    assert e.value.message == (
        f"{bundle}/manifest.json: section 'training.provenance' nests deeper than 32 levels "
        "(at 'training.provenance.note.a...'); flatten it: free-form sections are records, not "
        "trees"
    )
    shallow: Any = "x"
    for _ in range(29):  # 32 levels with training.provenance.note
        shallow = {"a": shallow}
    edit_json(bundle / "manifest.json", _set("training.provenance.note", shallow))
    assert load_bundle(bundle)


@pytest.mark.parametrize(
    ("key", "value", "expected"), [
        ("vocab", 5, "model.vocab must be an object or a list, got int"),
        ("merges", "ab", "model.merges must be a list, got str"),
    ],
)  # fmt: skip
def test_a_tokenizer_of_the_wrong_shape_is_a_bundle_error(
    tmp_path: Path, key: str, value: Any, expected: str
) -> None:
    """`"vocab": 5` was a bare TypeError, outside the load's errors."""
    bundle = _copy(tmp_path, "medical-abstracts/1")
    edit_json(bundle / "tokenizer.json", _set(f"model.{key}", value))
    repin(bundle, "tokenizer.json")
    with pytest.raises(BundleError) as e:
        load_bundle(bundle)
    assert e.value.message == (
        f"{bundle}/tokenizer.json: {expected}; write the tokenizer with the tokenizers library "
        "(tokenizer.save)"
    )


def test_batch_norm_without_running_statistics_is_refused(tmp_path: Path) -> None:
    """It normalises with each batch's statistics in eval mode too: an input's answer depended
    on what shared its batch (a reviewer's 0.41 alone, 0.52 beside two other rows)."""
    bundle = _copy(tmp_path, "digits/1")
    edit_json(
        bundle / "architecture.json",
        lambda d: d["modules"]["2"]["args"].__setitem__("track_running_stats", False),
    )
    repin(bundle, "architecture.json")
    with pytest.raises(BundleError) as e:
        load_bundle(bundle)
    assert e.value.message == (
        f"{bundle}/architecture.json: layer '2' (BatchNorm2d): track_running_stats=False "
        "normalises with each batch's own statistics, in eval mode too, so an input's answer "
        "would depend on the inputs batched with it; train it with track_running_stats=True "
        "(the default), or use LayerNorm or GroupNorm"
    )


def test_a_fifo_read_as_a_bundle_file_is_refused_not_waited_on(tmp_path: Path) -> None:
    """A FIFO renamed over an artifact after its checks blocked the open for good (start-up,
    or polling and every load behind its lock). The open does not wait, and the descriptor
    must be a regular file."""
    import threading

    from service.bundle.load import _read_bounded

    fifo = tmp_path / "weights.safetensors"
    os.mkfifo(fifo)
    out: list[BaseException | bytes] = []

    def read() -> None:
        try:
            out.append(_read_bounded(fifo, 1000, "max_artifact_bytes"))
        except BaseException as exc:
            out.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(5.0)
    if reader.is_alive():  # blocked in open(): a writer lets it go, then the test fails
        os.close(os.open(fifo, os.O_WRONLY))
        reader.join(5.0)
    [got] = out
    assert isinstance(got, BundleError) and got.message == (
        f"{fifo}: not a regular file; bundle files are plain files"
    )


def test_an_artifact_name_with_a_nul_is_a_bundle_error(bundle: Path) -> None:
    """It raised ValueError ('embedded null byte'), naming neither the file nor the fix."""
    edit_json(
        bundle / "manifest.json",
        lambda m: m["artifacts"].update({"a\0b": {"role": "data", "sha256": "0" * 64, "size": 1}}),
    )
    with pytest.raises(BundleError) as e:
        load_bundle(bundle)
    assert e.value.message.endswith("artifact names must be plain files in the bundle")
