"""Load a bundle directory, refusing anything that does not check out.

Order matters: the manifest is read (bounded) and checked against the pins, then each artifact the
manifest lists is read once, its size and hash verified, and those same bytes are parsed: no file
is opened twice, so what was hashed is what runs. Files are found by their role in the manifest,
never by a fixed name, and every file the model uses (ONNX external data included) must be listed.
Artifacts that can run code when loaded (`.pt2`, pickles) are refused unless the operator opted in.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx
import torch
from safetensors.torch import load as load_safetensors
from torch import nn

from service.bundle import external_data
from service.bundle.architecture import rebuild
from service.bundle.grammar import ArchitectureLimits
from service.bundle.manifest import MANIFEST_NAME, Manifest, parse_manifest
from service.bundle.onnx_graph import check_graph
from service.bundle.tokenizer import load_tokenizer
from service.bundle.vocabulary import check_vocabulary
from service.bundle.weights import check_finite
from service.bundle.words import read_words
from service.errors import BundleError, McServeError

if TYPE_CHECKING:  # settings is ground, below the format: only its type is named here
    from service.settings import Settings

CODE_SUFFIXES = {".pt2", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib"}
CODE_ROLES = {"pt2"}  # whatever the file is called
_SINGLE_ROLES = ("architecture", "weights", "onnx", "pt2", "tokenizer", "words")


@dataclass(frozen=True)
class TrustPolicy:
    """What the operator allows (from settings)."""

    allow_code_artifacts: bool = False
    max_artifact_bytes: int = 256 * 1024 * 1024
    max_bundle_bytes: int = 1024 * 1024 * 1024  # all of a bundle's artifacts together
    pinned_digests: Collection[str] = field(default_factory=frozenset)
    max_manifest_bytes: int = 16 * 1024 * 1024
    max_input_elements: int = 1 << 22  # values in one instance (4 Mi: a 3 x 1024 x 1024 image fits)
    architecture: ArchitectureLimits = field(default_factory=ArchitectureLimits)

    @classmethod
    def from_settings(cls, settings: Settings) -> TrustPolicy:
        """The operator's policy as configured (MCSERVE_ALLOW_CODE_ARTIFACTS, ...). Built here,
        not in `settings`, so that configuration stays in the ground layer and imports nothing."""
        return cls(
            allow_code_artifacts=settings.allow_code_artifacts,
            max_artifact_bytes=settings.max_artifact_bytes,
            max_bundle_bytes=settings.max_bundle_bytes,
            pinned_digests=frozenset(settings.pinned_digests),
            max_manifest_bytes=settings.max_manifest_bytes,
            max_input_elements=settings.max_input_elements,
        )


@dataclass
class LoadedBundle:
    path: Path
    manifest: Manifest
    digest: str  # "sha256:<hex>" of manifest.json, which holds every artifact's hash
    module: nn.Module
    onnx_bytes: bytes | None
    tokenizer: Any = None  # tokenizers.Tokenizer for text models (allow-listed JSON)
    words: frozenset[str] | None = None  # text models: the training texts' words (words.txt)


def bundle_digest(manifest_bytes: bytes) -> str:
    return "sha256:" + hashlib.sha256(manifest_bytes).hexdigest()


def _read_bounded(f: Path, limit: int, setting: str) -> bytes:
    """The file's bytes, read once from one open file; refused past `limit` before reading."""
    # Non-blocking, and a regular file by the open descriptor: a FIFO renamed over a checked
    # file blocked the open for good (start-up, polling and its lock with it).
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(f, flags)
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the name
        why = exc.strerror if isinstance(exc, OSError) else str(exc)
        raise BundleError(f"{f}: cannot be opened as a plain file ({why})") from exc
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BundleError(f"{f}: not a regular file; bundle files are plain files")
        size = st.st_size
        if size > limit:
            raise BundleError(f"{f}: {size} bytes, over the limit of {limit} (setting {setting})")
        data = fh.read(limit + 1)
    if len(data) > limit:  # grew while being read
        raise BundleError(f"{f}: over the limit of {limit} bytes (setting {setting})")
    return data


def _read_artifacts(path: Path, manifest: Manifest, policy: TrustPolicy) -> dict[str, bytes]:
    """Every listed artifact's verified bytes, by file name. Their sizes are summed before any
    is read: each within max_artifact_bytes, a dozen hard links to one file still made
    gigabytes (setting max_bundle_bytes)."""
    out: dict[str, bytes] = {}
    root = path.resolve()
    sizes: dict[str, int] = {}
    for fname, art in sorted(manifest.artifacts.items()):
        f = path / fname
        plain = not any(c in fname for c in "/\\\0") and not fname.startswith(".")
        if not plain or f.resolve().parent != root:
            raise BundleError(f"{f}: artifact names must be plain files in the bundle")
        if f.suffix in CODE_SUFFIXES and not policy.allow_code_artifacts:
            raise BundleError(
                f"{f}: '{f.suffix}' artifacts can run code when loaded; refused "
                "unless the operator sets allow_code_artifacts=true"
            )
        # By role too: a pt2 program under another name (model.bin) unpickles just the same.
        if art.role in CODE_ROLES and not policy.allow_code_artifacts:
            raise BundleError(
                f"{f}: role '{art.role}' is a program that can run code when loaded; refused "
                "unless the operator sets allow_code_artifacts=true"
            )
        try:  # one stat: a file deleted between two checks raised FileNotFoundError
            st = f.stat()
        except (OSError, ValueError):  # ValueError: a NUL in the name
            st = None
        if st is None or not stat.S_ISREG(st.st_mode):
            raise BundleError(f"{f}: artifact listed in the manifest is missing")
        sizes[fname] = size = st.st_size
        if size > policy.max_artifact_bytes:
            raise BundleError(
                f"{f}: artifact is {size} bytes, over the limit of "
                f"{policy.max_artifact_bytes} (setting max_artifact_bytes)"
            )
    total = sum(sizes.values())
    if total > policy.max_bundle_bytes:
        raise BundleError(
            f"{path / MANIFEST_NAME}: its {len(sizes)} artifacts hold {total} bytes together, "
            f"over the limit of {policy.max_bundle_bytes} (setting max_bundle_bytes); remove "
            "artifacts the model does not use, or raise the setting for this model directory"
        )
    left = policy.max_bundle_bytes
    for fname, art in sorted(manifest.artifacts.items()):
        f = path / fname
        # What is left of the bundle's budget bounds each read: a file may grow after its stat.
        limit, setting = min(
            (policy.max_artifact_bytes, "max_artifact_bytes"), (left, "max_bundle_bytes")
        )
        data = _read_bounded(f, limit, setting)
        left -= len(data)
        if len(data) != art.size or hashlib.sha256(data).hexdigest() != art.sha256:
            raise BundleError(f"{f}: sha256 does not match the manifest (tampered?)")
        out[fname] = data
    for f in path.iterdir():
        if f.suffix in CODE_SUFFIXES and not policy.allow_code_artifacts:
            raise BundleError(
                f"{f}: '{f.suffix}' files can run code when loaded; refused unless the operator "
                "sets allow_code_artifacts=true"
            )
    return out


def _by_role(path: Path, manifest: Manifest) -> dict[str, str]:
    """The file name of each single-file role; a role listed twice is refused."""
    names: dict[str, str] = {}
    for fname, art in sorted(manifest.artifacts.items()):
        if art.role in _SINGLE_ROLES:
            if art.role in names:
                raise BundleError(
                    f"{path / MANIFEST_NAME}: two artifacts with role '{art.role}' "
                    f"({names[art.role]}, {fname}); a bundle has one"
                )
            names[art.role] = fname
    return names


def _onnx_with_listed_external_data(
    path: Path, fname: str, files: dict[str, bytes], manifest: Manifest, policy: TrustPolicy
) -> bytes:
    """The graph's bytes with external data inlined from listed, hashed 'data' artifacts
    (external_data.py), once its cost is bounded (onnx_graph.py) and its weights are finite."""
    f = path / fname
    model = onnx.load_model_from_string(files[fname])
    external_data.inline(model, path, fname, files, manifest)
    external_data.check_finite(model, str(f))
    limit = policy.architecture.max_activation_elements
    check_graph(model, str(f), limit, list(manifest.inputs.shape))
    return bytes(model.SerializeToString())


def _check_inputs(mf: Path, manifest: Manifest, policy: TrustPolicy) -> None:
    n = manifest.inputs.features
    if n > policy.max_input_elements:
        raise BundleError(
            f"{mf}: one input of shape {manifest.inputs.shape} holds {n} values, over the limit "
            f"of {policy.max_input_elements} (setting max_input_elements)"
        )


def load_bundle(
    path: Path | str, policy: TrustPolicy | None = None, *, expected_digest: str | None = None
) -> LoadedBundle:
    """Verify and load one bundle directory; raises BundleError/ModelError with the reason.

    `expected_digest`: the digest a copy must have (the compute process loads exactly the
    bundle the server loaded), checked before anything but the manifest's bytes is read.
    """
    policy = policy or TrustPolicy()
    path = Path(path)
    mf = path / MANIFEST_NAME
    if not mf.is_file():
        raise BundleError(f"{mf}: no manifest in the bundle directory")
    raw = _read_bounded(mf, policy.max_manifest_bytes, "max_manifest_bytes")
    digest = bundle_digest(raw)
    if policy.pinned_digests and digest not in policy.pinned_digests:
        raise BundleError(f"{mf}: bundle digest {digest} is not one of the pinned digests")
    if expected_digest is not None and digest != expected_digest:
        raise BundleError(f"{mf}: bundle digest {digest}, expected {expected_digest}")
    manifest = parse_manifest(raw, str(mf))
    _check_inputs(mf, manifest, policy)
    files = _read_artifacts(path, manifest, policy)
    roles = _by_role(path, manifest)
    try:
        if "pt2" in roles:
            module = _load_pt2(files[roles["pt2"]])
        elif "architecture" in roles and "weights" in roles:
            where = str(path / roles["architecture"])
            try:
                desc = json.loads(files[roles["architecture"]])
            except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, huge numbers
                raise BundleError(f"{where}: not valid JSON ({exc})") from exc
            try:
                state = load_safetensors(files[roles["weights"]])
            except Exception as exc:  # safetensors raises its own error types
                raise BundleError(
                    f"{path / roles['weights']}: not a safetensors file ({exc})"
                ) from exc
            module = rebuild(
                desc,
                state,
                where=where,
                input_shape=list(manifest.inputs.shape),
                input_dtype=getattr(torch, manifest.inputs.dtype),
                limits=policy.architecture,
            )
            # the layers' weights; get_attr tensors (constants, masks) come back frozen
            learned = {name for name, w in module.named_parameters() if w.requires_grad}
            check_finite(state, str(path / roles["weights"]), learned)
        else:
            raise BundleError(f"{mf}: needs an 'architecture' and a 'weights' artifact (or a .pt2)")
        onnx_bytes = None
        if "onnx" in roles:
            onnx_bytes = _onnx_with_listed_external_data(
                path, roles["onnx"], files, manifest, policy
            )
        else:  # a 'data' artifact is a graph's external data: none without a graph
            external_data.unused(path, manifest, set())
    except McServeError:
        raise
    except Exception as exc:  # parsers raise many types; all mean "this artifact is unusable"
        raise BundleError(f"{path}: cannot load artifacts ({type(exc).__name__}: {exc})") from exc
    tokenizer, words = None, None
    text = manifest.inputs.text
    if text is not None:
        name = text.tokenizer
        if roles.get("tokenizer") != name:
            raise BundleError(f"{mf}: inputs.text.tokenizer '{name}' is not the listed tokenizer")
        tokenizer = load_tokenizer(files[name], str(path / name))
        if text.words is not None:
            wname = text.words.file
            if roles.get("words") != wname:
                raise BundleError(f"{mf}: inputs.text.words '{wname}' is not the listed word list")
            words = read_words(files[wname], str(path / wname), text.words.count)
    if manifest.inputs.dtype == "int64":  # ids past the embedding: a 500 on every such text
        check_vocabulary(
            module,
            manifest.inputs.value_range,
            tokenizer,
            text.pad_id if text is not None else None,
            str(mf),
            str(path / text.tokenizer) if text is not None else "the tokenizer",
        )
    if "words" in roles and words is None:
        raise BundleError(f"{mf}: a word list is listed but inputs.text.words does not name it")
    return LoadedBundle(path, manifest, digest, module.eval(), onnx_bytes, tokenizer, words)


def _load_pt2(data: bytes) -> nn.Module:
    program = torch.export.load(io.BytesIO(data))  # can run code: only after the opt-in
    module: nn.Module = program.module()
    return module
