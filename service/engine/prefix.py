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
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.experimental.optimization import fuse

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

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return _run(self.module, x, channels_last=self.channels_last)


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
