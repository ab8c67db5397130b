"""A bundle's ONNX graph made whole: external data inlined from listed, hashed `data` artifacts.

Every tensor the graph keeps outside itself must point at a listed artifact of role `data`
(read once and hashed with the rest, service/bundle/load.py); a location outside the bundle or
unlisted is refused wherever its tensor is. Every listed `data` artifact must be used by some
tensor: one nothing reads was still read into memory at load (12 hard links to one 200 MiB file
took 2.7 GB). The inlined graph's floating tensors must be finite.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import Message
from onnx import numpy_helper

from service.bundle.manifest import MANIFEST_NAME, Manifest
from service.errors import BundleError

_FLOATS = {
    onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
}  # fmt: skip


def all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto anywhere in the model, found through the protobuf schema itself.

    onnx's own walker (external_data_helper._get_all_tensors) skips sparse tensors (a
    `sparse_initializer`, a Constant's `sparse_value`): an external reference there reached
    onnxruntime unchecked, which read a file from the server's working directory into the
    graph. Walking every message field leaves no place a tensor can hide (functions, subgraphs,
    training info). A stack, not recursion: nesting depth is the bundle's choice."""
    stack: list[Message] = [model]
    while stack:
        msg = stack.pop()
        if isinstance(msg, onnx.TensorProto):
            yield msg
        children: list[Message] = []
        for fd, value in msg.ListFields():
            if fd.type == fd.TYPE_MESSAGE:
                children.extend(value if fd.is_repeated else [value])
        stack.extend(reversed(children))  # popped in the file's order


def inline(
    model: onnx.ModelProto, path: Path, fname: str, files: dict[str, bytes], manifest: Manifest
) -> None:
    """Inline every external tensor of `model` (the artifact `fname`) from its listed `data`
    artifact, in place; refuses a location outside the bundle or unlisted, and a listed `data`
    artifact that no tensor reads."""
    f = path / fname
    used: set[str] = set()
    for tensor in all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        loc = info.get("location", "")
        art = manifest.artifacts.get(loc)
        if art is None or art.role != "data" or loc not in files:
            where = (
                "lies outside the bundle"
                if (not (path / loc).resolve().is_relative_to(path.resolve()))
                else "is not listed in the manifest (role 'data')"
            )
            raise BundleError(f"{f}: external data '{loc}' of tensor '{tensor.name}' {where}")
        blob = files[loc]
        try:
            offset, length = int(info.get("offset", 0)), int(info.get("length", len(blob)))
        except ValueError as exc:
            raise BundleError(f"{f}: bad offset/length for tensor '{tensor.name}'") from exc
        if offset < 0 or length < 0 or offset + length > len(blob):
            raise BundleError(
                f"{f}: external data of tensor '{tensor.name}' lies past the end of '{loc}'"
            )
        tensor.raw_data = blob[offset : offset + length]
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]
        used.add(loc)
    unused(path, manifest, used)


def unused(path: Path, manifest: Manifest, used: set[str]) -> None:
    """Refuse a listed `data` artifact that no tensor of the ONNX graph reads (`used`)."""
    for name, art in sorted(manifest.artifacts.items()):
        if art.role == "data" and name not in used:
            raise BundleError(
                f"{path / name}: a 'data' artifact that no tensor of the ONNX graph reads; "
                f"remove it and its entry from {MANIFEST_NAME}'s artifacts (role 'data' is the "
                "graph's external data, nothing else)"
            )


def check_finite(model: onnx.ModelProto, where: str) -> None:
    """Refuse NaN anywhere. An infinity may be a constant (masked_fill's -inf, a mask buffer);
    an infinite weight the graph computes with is found by the probe at load, which compares
    its answers with torch's on weights checked finite (service/engine/onnx_predictor.py)."""
    for tensor in all_tensors(model):
        if tensor.data_type not in _FLOATS or tensor.data_location == onnx.TensorProto.EXTERNAL:
            continue
        values = np.asarray(numpy_helper.to_array(tensor))
        if values.dtype.kind != "f":  # bfloat16 reads as ml_dtypes' own type
            values = values.astype(np.float32)
        nan = np.isnan(values)
        if not nan.any():
            continue
        raise BundleError(
            f"{where}: tensor '{tensor.name}' holds nan ({int(nan.sum())} of its "
            f"{values.size} values are NaN); a served graph's weights are numbers: fix the "
            "weights and export the graph again"
        )
