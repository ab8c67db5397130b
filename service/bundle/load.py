"""Load a bundle directory, refusing anything that does not check out.

Order matters: the manifest is read and every artifact's size and hash verified before any
artifact is parsed, so a tampered or oversized file is never handed to a parser. Artifacts that
can run code when loaded (`.pt2`, pickles) are refused unless the operator opted in.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch
from safetensors.torch import load_file
from torch import nn

from service.bundle.architecture import rebuild
from service.bundle.manifest import MANIFEST_NAME, Manifest, parse_manifest
from service.bundle.writer import ARCH_FILE, ONNX_FILE, WEIGHTS_FILE, sha256_file
from service.errors import BundleError, McServeError

CODE_SUFFIXES = {".pt2", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib"}


@dataclass(frozen=True)
class TrustPolicy:
    """What the operator allows (from settings)."""

    allow_code_artifacts: bool = False
    max_artifact_bytes: int = 256 * 1024 * 1024
    pinned_digests: Collection[str] = field(default_factory=frozenset)


@dataclass
class LoadedBundle:
    path: Path
    manifest: Manifest
    digest: str  # "sha256:<hex>" of manifest.json, which holds every artifact's hash
    module: nn.Module
    onnx_bytes: bytes | None


def bundle_digest(manifest_bytes: bytes) -> str:
    return "sha256:" + hashlib.sha256(manifest_bytes).hexdigest()


def _verify_artifacts(path: Path, manifest: Manifest, policy: TrustPolicy) -> None:
    for fname, art in sorted(manifest.artifacts.items()):
        f = (path / fname).resolve()
        if not f.is_relative_to(path.resolve()) or "/" in fname or fname.startswith("."):
            raise BundleError(f"{path / fname}: artifact names must be plain files in the bundle")
        if not f.is_file():
            raise BundleError(f"{path / fname}: artifact listed in the manifest is missing")
        size = f.stat().st_size
        if size > policy.max_artifact_bytes:
            raise BundleError(
                f"{path / fname}: artifact is {size} bytes, over the limit of "
                f"{policy.max_artifact_bytes} (setting max_artifact_bytes)"
            )
        if sha256_file(f) != art.sha256:
            raise BundleError(f"{path / fname}: sha256 does not match the manifest (tampered?)")
        if f.suffix in CODE_SUFFIXES and not policy.allow_code_artifacts:
            raise BundleError(
                f"{path / fname}: '{f.suffix}' artifacts can run code when loaded; refused "
                "unless the operator sets allow_code_artifacts=true"
            )
    for f in path.iterdir():
        if f.suffix in CODE_SUFFIXES and not policy.allow_code_artifacts:
            raise BundleError(
                f"{f}: '{f.suffix}' files can run code when loaded; refused unless the operator "
                "sets allow_code_artifacts=true"
            )


def _onnx_with_checked_external_data(path: Path) -> bytes:
    """The graph's bytes with external data inlined, refusing data outside the bundle."""
    f = path / ONNX_FILE
    model = onnx.load(str(f), load_external_data=False)
    root = path.resolve()
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        loc = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (path / loc).resolve()
        if not target.is_relative_to(root) or not target.is_file():
            raise BundleError(
                f"{f}: external data '{loc}' of tensor '{tensor.name}' lies outside the bundle"
            )
    onnx.load_external_data_for_model(model, str(path))
    return bytes(model.SerializeToString())


def _load_pt2(path: Path, manifest: Manifest) -> nn.Module:
    name = next(n for n, a in manifest.artifacts.items() if a.role == "pt2")
    program = torch.export.load(str(path / name))  # can run code: only after the opt-in
    module: nn.Module = program.module()
    return module


def load_bundle(path: Path | str, policy: TrustPolicy | None = None) -> LoadedBundle:
    """Verify and load one bundle directory; raises BundleError/ModelError with the reason."""
    policy = policy or TrustPolicy()
    path = Path(path)
    mf = path / MANIFEST_NAME
    if not mf.is_file():
        raise BundleError(f"{mf}: no manifest in the bundle directory")
    raw = mf.read_bytes()
    manifest = parse_manifest(raw, str(mf))
    digest = bundle_digest(raw)
    if policy.pinned_digests and digest not in policy.pinned_digests:
        raise BundleError(f"{mf}: bundle digest {digest} is not one of the pinned digests")
    _verify_artifacts(path, manifest, policy)
    roles = {a.role for a in manifest.artifacts.values()}
    try:
        if "pt2" in roles:
            module = _load_pt2(path, manifest)
        elif {"architecture", "weights"} <= roles:
            desc = json.loads((path / ARCH_FILE).read_text())
            module = rebuild(desc, load_file(str(path / WEIGHTS_FILE)))
        else:
            raise BundleError(f"{mf}: needs architecture.json + weights.safetensors (or a .pt2)")
        onnx_bytes = _onnx_with_checked_external_data(path) if "onnx" in roles else None
    except McServeError:
        raise
    except Exception as exc:  # parsers raise many types; all mean "this artifact is unusable"
        raise BundleError(f"{path}: cannot load artifacts ({type(exc).__name__}: {exc})") from exc
    return LoadedBundle(path, manifest, digest, module.eval(), onnx_bytes)
