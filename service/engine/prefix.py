"""The deterministic prefix, rewritten for inference once at load time.

The prefix (every node no dropout reaches, see graph.py) only ever runs in eval mode on frozen
weights, so it can take the rewrites that inference runtimes (TensorRT, onnxruntime) make:

* each BatchNorm after a convolution or linear layer is folded into that layer's weights (one
  pass over the activations less per BatchNorm);
* on the CPU, image prefixes run in channels-last memory layout, where torch's convolutions and
  pooling vectorise across channels: measured on the digits prefix (two 3x3 convolutions and a
  2x2 max-pool over 8x8 images, 64 inputs) 0.53 against 0.75 ms, the max-pool alone 0.07 against
  0.40 ms.

Each rewrite is checked against the plain prefix on the example input and on random inputs when
the model loads, and dropped if it fails or disagrees beyond float rounding (a model that calls
`.view()` on its activations cannot run channels-last, for instance). The model's own modules are
never changed: a rewritten prefix is a copy, so where a rewrite is kept the prefix's parameters
are held twice (under 1 MiB for the bundled models; as much again as the trunk for a large image
model). A prefix with no BatchNorm is not copied for folding; one with no convolution or pooling
is not tried in channels-last.

The sampler pads the prefix's batch to `min_rows` inputs (64 on the CPU) where an operation's
algorithm, and so its rounding, follows the batch size: convolutions and pooling (oneDNN chooses
by batch: measured, 1 image against 64), recurrent layers, and matrix products whose rows hold
the batch (not in per-input blocks, blocks.py). A prefix without them (a transformer's
embeddings and attention: linear layers in per-input blocks, attention products batched per
input and head, row-wise softmax and norms) is padded to 2 inputs only (a lone input with one
head would be a batched product of one, which MKL computes with other code, blocks.py): at
B = 32 head-only sampling ran bench.text's whole encoder on 64 documents.
"""

from __future__ import annotations

import copy
import logging
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.experimental.optimization import fuse
from torch.fx.passes.shape_prop import ShapeProp

from service.engine import progress
from service.engine.blocks import live_rows

log = logging.getLogger(__name__)

# Rewrites change float rounding only: results must agree to this relative tolerance.
RTOL = 1e-4


class Prefix:
    """Callable: input batch -> tuple of contiguous frontier tensors."""

    def __init__(self, graph: fx.GraphModule, example: torch.Tensor) -> None:
        self.module: fx.GraphModule = graph
        self.channels_last = False
        self.rewrites: list[str] = []
        # Checked on the example and on random inputs: a bundle's example may be all zeros,
        # where a convolution's output is its bias whatever its weights.
        gen = torch.Generator().manual_seed(0)
        if example.dtype.is_floating_point:
            noise = torch.randn((3, *example.shape[1:]), generator=gen) * 3
        else:  # token ids: random ids no larger than the example's (valid for its embedding)
            top = int(example.max()) + 1 if example.numel() else 1
            noise = torch.randint(0, top, (3, *example.shape[1:]), generator=gen)
        probe = torch.cat([example, noise.to(example.device, example.dtype)])
        with torch.inference_mode():
            reference = _run(graph, probe, channels_last=False)
        # Each rewrite only where it can pay: a copy of the prefix costs memory, and
        # channels-last costs layout conversions where no convolution or pooling uses it
        # (measured: a Flatten -> Linear prefix 0.73 -> 1.25 ms).
        folded = _fold_batchnorm(graph) if _count(graph, _BATCHNORM) else None
        if (
            folded is not None
            and _count(folded, _BATCHNORM) < _count(graph, _BATCHNORM)
            and _agrees(folded, probe, reference, channels_last=False)
        ):
            self.module = folded
            self.rewrites.append("batchnorm folded")
        if example.device.type == "cpu" and example.dim() == 4 and _count(graph, _SPATIAL):
            candidate = copy.deepcopy(self.module).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
            if _agrees(candidate, probe, reference, channels_last=True):
                self.module, self.channels_last = candidate, True
                self.rewrites.append("channels-last")
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.batch_sensitive = batch_sensitive(graph, example)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return _run(self.module, x, channels_last=self.channels_last)

    def in_chunks(
        self, xs: torch.Tensor, chunk: int, pad_to: int, batched: tuple[bool, ...]
    ) -> list[torch.Tensor]:
        """The values for inputs `xs`, `chunk` inputs at a time, each padded to `pad_to` inputs
        (a prefix's values per input never depend on the batch: blocks.py), copied into place
        so that one chunk's intermediate values live at a time. `batched`: per value, whether
        it has a row per input (else it is the same in every chunk: the first's is kept)."""
        total = xs.shape[0]
        out: list[torch.Tensor] = []
        for lo in range(0, total, chunk):
            part = xs[lo : lo + chunk]
            n = part.shape[0]
            if n < pad_to:
                part = torch.cat([part, part[:1].expand(pad_to - n, *part.shape[1:])])  # not 0s
            with live_rows(n):  # padding inputs skip the prefix's linear layers
                values = self(part)
            progress.tick()
            if n == total:  # one chunk: its values as they are
                return [v[:n] if b else v for v, b in zip(values, batched, strict=True)]
            if not out:
                out = [
                    v.new_empty((total, *v.shape[1:])) if b else v
                    for v, b in zip(values, batched, strict=True)
                ]
            for o, v, b in zip(out, values, batched, strict=True):
                if b:
                    o[lo : lo + n] = v[:n]
        return out


def _run(
    module: fx.GraphModule, x: torch.Tensor, *, channels_last: bool
) -> tuple[torch.Tensor, ...]:
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out = module(x)
    # The suffix and the mask kernel index rows of plain contiguous tensors.
    return tuple(t.contiguous() for t in out)


_BATCHNORM = (nn.modules.batchnorm._BatchNorm,)
# Layers whose CPU kernels gain from channels-last memory.
_SPATIAL = (
    nn.modules.conv._ConvNd,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
)
_SPATIAL_FUNCTIONS = {
    F.conv2d,
    torch.conv2d,
    F.max_pool2d,
    torch.max_pool2d,
    F.avg_pool2d,
    F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d,
}


def _count(graph: fx.GraphModule, kinds: tuple[type[nn.Module], ...]) -> int:
    """Nodes of the graph that call a module of `kinds` (for _SPATIAL also the functional ops)."""
    modules = sum(
        1
        for node in graph.graph.nodes
        if node.op == "call_module" and isinstance(graph.get_submodule(str(node.target)), kinds)
    )
    functions = sum(
        1
        for node in graph.graph.nodes
        if node.op == "call_function" and node.target in _SPATIAL_FUNCTIONS
    )
    return modules + (functions if kinds is _SPATIAL else 0)


def _fold_batchnorm(graph: fx.GraphModule) -> fx.GraphModule | None:
    try:
        folded = fuse(graph, inplace=False, no_trace=True)  # a copy; skips shared outputs
    except Exception as exc:  # an unusual layer torch's folding rejects: keep the plain prefix
        log.info("prefix: BatchNorm not folded (%s: %s)", type(exc).__name__, exc)
        return None
    assert isinstance(folded, fx.GraphModule)
    return folded


def _agrees(
    candidate: fx.GraphModule,
    example: torch.Tensor,
    reference: tuple[torch.Tensor, ...],
    *,
    channels_last: bool,
) -> bool:
    """Does the rewritten prefix give the plain prefix's values on the example, to rounding?"""
    try:
        with torch.inference_mode():
            got = _run(candidate, example, channels_last=channels_last)
    except Exception as exc:  # e.g. .view() on a channels-last activation
        log.info("prefix rewrite dropped (%s: %s)", type(exc).__name__, exc)
        return False
    if len(got) != len(reference):
        return False
    for g, r in zip(got, reference, strict=True):
        if g.shape != r.shape or g.dtype != r.dtype:
            return False
        if g.is_floating_point():
            scale = float(r.abs().max()) if r.numel() else 0.0
            if not bool(((g - r).abs() <= RTOL * max(scale, 1.0)).all()):
                log.info("prefix rewrite dropped: values differ beyond rounding")
                return False
        elif not torch.equal(g, r):
            return False
    return True


# Modules that keep each input's bits whatever the batch size (nn.Linear: in per-input blocks on
# the CPU, blocks.py). Any other module type (convolutions, pooling, recurrent layers, a module
# not listed) counts as batch-sensitive: the prefix keeps the full pad.
_ROW_WISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Embedding,
    nn.LayerNorm,
    nn.Identity,
    nn.Flatten,
    nn.Unflatten,
    nn.ReLU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Softmax,
    nn.LogSoftmax,
    nn.Dropout,
)
_BATCH_SENSITIVE_FUNCTIONS: set[Any] = {
    torch.mm,
    torch.addmm,
    torch.einsum,
    torch.tensordot,
    F.bilinear,
    torch.conv1d,
    torch.conv2d,
    torch.conv3d,
    F.conv1d,
    F.conv2d,
    F.conv3d,
    F.conv_transpose1d,
    F.conv_transpose2d,
    F.conv_transpose3d,
    torch.lstm,
    torch.gru,
    torch.rnn_tanh,
    torch.rnn_relu,
    *_SPATIAL_FUNCTIONS,
    F.max_pool1d,
    F.max_pool3d,
    F.avg_pool1d,
    F.avg_pool3d,
}
_BATCHED_PRODUCTS: set[Any] = {torch.matmul, operator.matmul, torch.bmm, torch.baddbmm}
_BATCH_SENSITIVE_METHODS = {"mm", "addmm"}


def batch_sensitive(graph: fx.GraphModule, example: torch.Tensor) -> bool:
    """Does an operation of the prefix choose its algorithm by the batch size (see the module
    docstring)? Matrix products count unless both operands have a batch of products (3 or
    more dimensions, read from a run on the example): a [B, L, d] @ [d, k] folds B into the
    rows of one product."""
    try:
        gm = fx.GraphModule(graph, copy.deepcopy(graph.graph))
        with torch.inference_mode():
            ShapeProp(gm).propagate(example)
    except Exception as exc:  # shapes unknown: keep the full pad
        log.info("prefix: shapes not propagated (%s: %s)", type(exc).__name__, exc)
        return True

    def dims(a: Any) -> int:
        meta = a.meta.get("tensor_meta") if isinstance(a, fx.Node) else None
        return len(meta.shape) if meta is not None and hasattr(meta, "shape") else 0

    for n in gm.graph.nodes:
        if n.op == "call_module":
            if type(gm.get_submodule(str(n.target))) not in _ROW_WISE_MODULES:
                return True
        elif (n.op == "call_function" and n.target in _BATCH_SENSITIVE_FUNCTIONS) or (
            n.op == "call_method" and n.target in _BATCH_SENSITIVE_METHODS
        ):
            return True
        elif (n.op == "call_function" and n.target in _BATCHED_PRODUCTS) or (
            n.op == "call_method" and n.target in ("matmul", "bmm", "baddbmm")
        ):
            operands = n.args[1:3] if n.target in (torch.baddbmm, "baddbmm") else n.args[:2]
            if min((dims(a) for a in operands), default=0) < 3:
                return True
    return False
