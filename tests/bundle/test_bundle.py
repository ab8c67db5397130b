"""Bundles: round trips, and one test per refusal asserting the exact message."""

from __future__ import annotations

import json
import pickle
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from nets import FunctionalDropout, SmallCNN, mlp, trained_bn
from torch import nn

from service.bundle import TrustPolicy, bundle_digest, load_bundle
from service.bundle.fingerprint import sha256_file
from service.engine import MCRequest, MCSampler
from service.engine.model import ServedModel
from service.engine.params import PredictParams
from service.errors import BundleError, ModelError
from service.packaging import save

ORIGINALS: dict[str, nn.Module] = {}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bundles")
    torch.manual_seed(0)
    ORIGINALS["mlp"] = mlp(0.25)
    ORIGINALS["cnn"] = trained_bn(SmallCNN(0.5), (1, 8, 8))
    m = save(
        ORIGINALS["mlp"],
        torch.randn(4, 6),
        out_dir=root,
        name="mlp",
        version="1",
        task="classification",
        intended_use="tests",
        labels=["a", "b"],
    )
    c = save(
        ORIGINALS["cnn"],
        torch.randn(4, 1, 8, 8),
        out_dir=root,
        name="cnn",
        version="1",
        task="classification",
        intended_use="tests",
        labels=["w", "x", "y", "z"],
    )
    return {"mlp": m, "cnn": c}


@pytest.fixture()
def bundle(built: dict[str, Path], tmp_path: Path) -> Path:
    """A private copy of the MLP bundle that a test may damage."""
    dest = tmp_path / "mlp" / "1"
    shutil.copytree(built["mlp"], dest)
    return dest


def rewrite_manifest(path: Path, **changes: object) -> None:
    data = json.loads((path / "manifest.json").read_text())
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = data
        for p in parents:
            node = node[p]
        node[leaf] = value
    (path / "manifest.json").write_text(json.dumps(data))


def rehash(path: Path, name: str) -> None:
    data = json.loads((path / "manifest.json").read_text())
    data["artifacts"][name]["sha256"] = sha256_file(path / name)
    data["artifacts"][name]["size"] = (path / name).stat().st_size
    (path / "manifest.json").write_text(json.dumps(data))


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_round_trip(built: dict[str, Path], name: str) -> None:
    original = ORIGINALS[name]
    loaded = ServedModel(load_bundle(built[name]))
    x = torch.randn(16, *loaded.manifest.inputs.shape, generator=torch.Generator().manual_seed(9))
    with torch.inference_mode():
        logits = original.eval()(x).numpy()
    det = loaded.predict(
        x.numpy(), PredictParams(samples=2, confidence=(0.9,), mode="deterministic")
    )
    assert det.backend == "onnxruntime"
    e = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(det.point, e / e.sum(1, keepdims=True), rtol=0, atol=1e-5)
    assert_same_mc(loaded, original, x)


def assert_same_mc(loaded: ServedModel, original: nn.Module, x: torch.Tensor) -> None:
    """The loaded sampler against the original module's (other seeds): per input and output,
    the means of 2,000 passes within 4.5 standard errors."""
    passes = 2000
    a = loaded.sampler.run([MCRequest(x.numpy(), passes, 1)])[0].astype(np.float64)
    b = MCSampler(original, x).run([MCRequest(x.numpy(), passes, 2)])[0].astype(np.float64)
    se = np.sqrt(a.var(0) / passes + b.var(0) / passes)
    assert np.all(np.abs(a.mean(0) - b.mean(0)) < 4.5 * se + 1e-9)


class Reordered(nn.Module):
    """Reads its features through an integer index buffer (a permutation), as a model that
    picks or reorders columns does."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("order", torch.tensor([2, 0, 3, 1]))
        self.net = mlp(0.25, d_in=4, hidden=8, d_out=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x[:, self.order])


def test_an_integer_buffer_keeps_its_dtype(tmp_path: Path) -> None:
    """The rebuilt graph's placeholders were float32 whatever the weights held: indexing with
    the buffer failed in the load's meta run, and such a model could not be saved ("does not
    accept inputs of shape [4]")."""
    torch.manual_seed(0)
    original = Reordered()
    path = save(
        original, torch.randn(4, 4), out_dir=tmp_path, name="reordered", version="1",
        task="classification", intended_use="tests", labels=["a", "b"],
    )  # fmt: skip
    loaded = ServedModel(load_bundle(path))
    assert dict(loaded.bundle.module.state_dict())["order"].dtype == torch.int64
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        logits = original.eval()(x).numpy()
    e = np.exp(logits - logits.max(1, keepdims=True))
    det = loaded.predict(
        x.numpy(), PredictParams(samples=2, confidence=(0.9,), mode="deterministic")
    )
    np.testing.assert_allclose(det.point, e / e.sum(1, keepdims=True), rtol=0, atol=1e-5)
    assert_same_mc(loaded, original, x)


def test_tampered_hash(bundle: Path) -> None:
    data = bytearray((bundle / "weights.safetensors").read_bytes())
    data[-1] ^= 1
    (bundle / "weights.safetensors").write_bytes(bytes(data))
    with pytest.raises(BundleError) as e:
        load_bundle(bundle)
    assert e.value.message == (
        f"{bundle}/weights.safetensors: sha256 does not match the manifest (tampered?)"
    )


def test_missing_artifact(bundle: Path) -> None:
    (bundle / "model.onnx").unlink()
    with pytest.raises(BundleError) as e:
        load_bundle(bundle)
    assert e.value.message == f"{bundle}/model.onnx: artifact listed in the manifest is missing"


def test_no_dropout(tmp_path: Path) -> None:
    with pytest.raises(ModelError) as e:
        save(
            nn.Sequential(nn.Linear(6, 2)),
            torch.randn(2, 6),
            out_dir=tmp_path,
            name="x",
            version="1",
            task="classification",
            intended_use="t",
            labels=["a", "b"],
        )
    assert e.value.message == (
        "the model has no dropout layer with p > 0, so MC dropout has no effect"
    )
    assert not (tmp_path / "x").exists()


def test_functional_dropout_at_save(tmp_path: Path) -> None:
    with pytest.raises(ModelError) as e:
        save(
            FunctionalDropout(),
            torch.randn(2, 6),
            out_dir=tmp_path,
            name="x",
            version="1",
            task="classification",
            intended_use="t",
            labels=["a", "b"],
        )
    assert e.value.message.startswith("functional dropout at node 'dropout'")
    assert "replace it with an nn.Dropout module" in e.value.message


def test_shape_mismatch_labels(bundle: Path) -> None:
    rewrite_manifest(bundle, outputs__labels=["a", "b", "c"])
    with pytest.raises(BundleError) as e:
        ServedModel(load_bundle(bundle))
    assert e.value.message == (
        f"{bundle}: shape mismatch: the model outputs [2] per input but the manifest "
        "declares 3 output(s)"
    )


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"outputs__labels": ["a", "a"]}, "outputs.labels lists 'a' twice"),
        ({"inputs__feature_names": ["f", "g", "f", "h", "i", "j"]}, "feature_names lists 'f'"),
    ],
)
def test_a_name_given_twice_is_refused(bundle: Path, change: dict[str, Any], expected: str) -> None:
    """A label twice loaded, and /v1 answered with one class's probability dropped (its answer
    keys probabilities by label); a feature name twice filled both features from one key."""
    rewrite_manifest(bundle, **change)
    with pytest.raises(BundleError, match=expected):
        load_bundle(bundle)


@pytest.mark.parametrize("twice", [{"labels": ["a", "a"]}, {"feature_names": ["x"] * 6}])
def test_save_refuses_a_name_given_twice_before_writing(
    tmp_path: Path, twice: dict[str, Any]
) -> None:
    kwargs: dict[str, Any] = {"labels": ["a", "b"], **twice}
    with pytest.raises(ModelError, match="twice; each"):
        save(
            mlp(0.25), torch.randn(4, 6), out_dir=tmp_path, name="m", version="1",
            task="classification", intended_use="tests", **kwargs,
        )  # fmt: skip
    assert not (tmp_path / "m").exists()


def test_shape_mismatch_inputs(bundle: Path) -> None:
    rewrite_manifest(bundle, inputs__shape=[7])
    with pytest.raises(BundleError) as e:
        ServedModel(load_bundle(bundle))
    # Refused while loading, on a meta input (no memory), naming the architecture file.
    assert e.value.message.startswith(
        f"{bundle}/architecture.json: the model does not accept inputs of shape [7] (RuntimeError: "
    )


def test_dropout_layout_mismatch(bundle: Path) -> None:
    data = json.loads((bundle / "manifest.json").read_text())
    data["dropout"][0]["p"] = 0.5
    (bundle / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match=re.escape(f"{bundle}: dropout layout")):
        ServedModel(load_bundle(bundle))


def test_newer_schema(bundle: Path) -> None:
    rewrite_manifest(bundle, schema_version=2)
    with pytest.raises(BundleError) as e:
        load_bundle(bundle)
    assert e.value.message == (
        f"{bundle}/manifest.json: manifest schema version 2 is newer than this mcserve "
        "supports (up to 1); upgrade mcserve to load this bundle"
    )


def test_an_unknown_field_says_a_newer_mcserve_may_have_written_it(bundle: Path) -> None:
    """Fields are added without a schema bump (a text bundle's word list): a server that lacks
    one should say that it may be too old, not only that the field is not permitted."""
    data = json.loads((bundle / "manifest.json").read_text())
    data["inputs"]["novel_check"] = {"file": "novel.txt"}
    (bundle / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError) as e:
        load_bundle(bundle)
    assert e.value.message == (
        f"{bundle}/manifest.json: invalid manifest at 'inputs.novel_check': Extra inputs are "
        "not permitted (a field this mcserve does not know: a newer mcserve may have written "
        "this bundle; upgrade mcserve, or serve a version of the model without the field)"
    )


def test_external_data_escaping(bundle: Path, tmp_path: Path) -> None:
    model = onnx.load(str(bundle / "model.onnx"))
    outside = tmp_path / "secret.bin"
    onnx.save_model(
        model,
        str(bundle / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    # Point the first external tensor outside the bundle directory.
    model = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    shutil.copy(bundle / "weights.bin", outside)
    for t in onnx.external_data_helper._get_all_tensors(model):
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = "../../secret.bin"
        break
    onnx.save_model(model, str(bundle / "model.onnx"))
    rehash(bundle, "model.onnx")
    with pytest.raises(BundleError) as e:
        load_bundle(bundle)
    first = next(iter(onnx.external_data_helper._get_all_tensors(model)))
    assert e.value.message == (
        f"{bundle}/model.onnx: external data '../../secret.bin' of tensor '{first.name}' "
        "lies outside the bundle"
    )


def test_external_data_inside_is_fine(bundle: Path) -> None:
    model = onnx.load(str(bundle / "model.onnx"))
    onnx.save_model(
        model,
        str(bundle / "model.onnx"),
        save_as_external_data=True,
        location="weights.bin",
        size_threshold=0,
    )
    rehash(bundle, "model.onnx")
    data = json.loads((bundle / "manifest.json").read_text())
    data["artifacts"]["weights.bin"] = {"role": "data", "sha256": "0" * 64, "size": 0}
    (bundle / "manifest.json").write_text(json.dumps(data))
    rehash(bundle, "weights.bin")  # external data is an artifact: listed and hashed
    assert load_bundle(bundle).onnx_bytes


def test_oversized_artifact(bundle: Path) -> None:
    size = (bundle / "model.onnx").stat().st_size
    with pytest.raises(BundleError) as e:
        load_bundle(bundle, TrustPolicy(max_artifact_bytes=4096))
    # Artifacts are checked in name order: architecture.json (small) passes, model.onnx not.
    assert e.value.message == (
        f"{bundle}/model.onnx: artifact is {size} bytes, over the limit of 4096 "
        "(setting max_artifact_bytes)"
    )


def test_the_trust_policy_is_the_operators_settings(
    bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every TrustPolicy field that is also a setting is carried over from the environment (the
    policy is built on the bundle's side: settings imports nothing of the service)."""
    from dataclasses import fields

    from service.settings import Settings

    digest = bundle_digest((bundle / "manifest.json").read_bytes())
    given = {
        "allow_code_artifacts": True,
        "max_artifact_bytes": 4096,
        "max_bundle_bytes": 1 << 20,
        "pinned_digests": frozenset({digest}),
        "max_manifest_bytes": 2048,
        "max_input_elements": 7,
    }
    for name, value in given.items():
        env = json.dumps(sorted(value)) if isinstance(value, frozenset) else str(value)
        monkeypatch.setenv(f"MCSERVE_{name.upper()}", env)
    policy = TrustPolicy.from_settings(Settings())
    shared = {f.name for f in fields(TrustPolicy)} & set(Settings.model_fields)
    assert shared == set(given)  # a new shared field needs a line in from_settings and here
    assert {name: getattr(policy, name) for name in shared} == given
    with pytest.raises(BundleError, match="over the limit of 4096"):
        load_bundle(bundle, policy)


def test_digest_not_pinned(bundle: Path) -> None:
    digest = bundle_digest((bundle / "manifest.json").read_bytes())
    assert load_bundle(bundle, TrustPolicy(pinned_digests={digest})).digest == digest
    with pytest.raises(BundleError) as e:
        load_bundle(bundle, TrustPolicy(pinned_digests={"sha256:" + "0" * 64}))
    assert e.value.message == (
        f"{bundle}/manifest.json: bundle digest {digest} is not one of the pinned digests"
    )


def test_version_is_immutable(built: dict[str, Path]) -> None:
    with pytest.raises(BundleError, match="already exists: bundle versions are immutable"):
        save(
            mlp(0.25),
            torch.randn(4, 6),
            out_dir=built["mlp"].parent.parent,
            name="mlp",
            version="1",
            task="classification",
            intended_use="t",
            labels=["a", "b"],
        )


class _Payload:
    """Unpickling this writes a marker file: what a crafted .pt2 can do to a loader."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[Path, str]]:
        return (Path.write_text, (self.marker, "pwned"))


def _malicious_pt2(path: Path, marker: Path) -> None:
    module = nn.Sequential(nn.Linear(6, 2), nn.Dropout(0.2)).eval()
    torch.export.save(torch.export.export(module, (torch.randn(2, 6),)), str(path))
    src = zipfile.ZipFile(path)
    items = {i.filename: src.read(i.filename) for i in src.infolist()}
    src.close()
    cfg_name = next(n for n in items if n.endswith("model_weights_config.json"))
    cfg = json.loads(items[cfg_name])
    first = next(iter(cfg["config"].values()))
    first["use_pickle"] = True  # the loader then calls torch.load(weights_only=False)
    items[cfg_name] = json.dumps(cfg).encode()
    weight = next(n for n in items if n.endswith("/weights/" + first["path_name"]))
    items[weight] = pickle.dumps(_Payload(marker))
    with zipfile.ZipFile(path, "w") as out:
        for n, data in items.items():
            out.writestr(n, data)


def test_malicious_pt2_refused_and_never_runs(bundle: Path, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    _malicious_pt2(bundle / "model.pt2", marker)
    data = json.loads((bundle / "manifest.json").read_text())
    data["artifacts"]["model.pt2"] = {
        "sha256": sha256_file(bundle / "model.pt2"),
        "size": (bundle / "model.pt2").stat().st_size,
        "role": "pt2",
    }
    (bundle / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError) as e:
        load_bundle(bundle)
    assert e.value.message == (
        f"{bundle}/model.pt2: '.pt2' artifacts can run code when loaded; refused unless the "
        "operator sets allow_code_artifacts=true"
    )
    assert not marker.exists()
    # The payload is live: with the operator's opt-in the same file runs its code.
    with pytest.raises(Exception):  # noqa: B017 - whatever the loader raises after the payload ran
        load_bundle(bundle, TrustPolicy(allow_code_artifacts=True))
    assert marker.read_text() == "pwned"


@pytest.mark.parametrize("name", ["model.bin", "weights2.safetensors", "pt2"])
def test_pt2_role_under_any_name_refused_and_never_runs(
    bundle: Path, tmp_path: Path, name: str
) -> None:
    """The suffix alone was the gate: a pt2 program listed as `model.bin` was unpickled."""
    marker = tmp_path / "ran"
    _malicious_pt2(bundle / name, marker)
    data = json.loads((bundle / "manifest.json").read_text())
    data["artifacts"][name] = {
        "sha256": sha256_file(bundle / name),
        "size": (bundle / name).stat().st_size,
        "role": "pt2",
    }
    (bundle / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError) as err:
        load_bundle(bundle)
    assert str(err.value) == (
        f"{bundle}/{name}: role 'pt2' is a program that can run code when loaded; refused "
        "unless the operator sets allow_code_artifacts=true"
    )
    assert not marker.exists()


def test_stray_pt2_file_refused(bundle: Path) -> None:
    (bundle / "extra.pt2").write_bytes(b"not listed")
    with pytest.raises(BundleError) as e:
        load_bundle(bundle)
    assert e.value.message == (
        f"{bundle}/extra.pt2: '.pt2' files can run code when loaded; refused unless the "
        "operator sets allow_code_artifacts=true"
    )
