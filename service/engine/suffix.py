"""One forward of a split's suffix (the stochastic part) over a chunk of rows, with its masks.

Two ways to the same numbers: `eager` makes every keep mask as a torch tensor and then runs the
layers; `fused` hands the layers `MaskRows` that a numba kernel applies where each mask is used
(fused.py), without the mask tensors. The sampler picks one (`MCSampler.fused`), or compiles
`eager` with torch.compile.
"""

from __future__ import annotations

import torch

from service.engine.fused import MaskRows
from service.engine.graph import SplitGraph
from service.engine.masks import keep_bytes_rows, keep_factors


def eager(
    g: SplitGraph,
    inputs: list[torch.Tensor],
    keys: list[torch.Tensor],
    base: torch.Tensor,
    rows: torch.Tensor,  # unused: every batched input comes gathered
) -> torch.Tensor:
    """Keep masks from the counters, then the layers."""
    keeps = [
        keep_factors(keep_bytes_rows(key, base, site.features), site.rule.threshold).view(
            -1, *site.mask_shape
        )
        for key, site in zip(keys, g.sites, strict=True)
    ]
    return g.suffix(*inputs, *keeps)


def fused(
    g: SplitGraph,
    inputs: list[torch.Tensor],
    keys: list[torch.Tensor],
    base: torch.Tensor,
    rows: torch.Tensor,
) -> torch.Tensor:
    """Each mask made where it is applied (fused.py); a prefix value used only by a dropout
    comes ungathered and the kernel reads its `rows` in place."""
    masks = [
        MaskRows(
            key,
            base,
            site.rule.threshold,
            site.mask_shape,
            rows if i in g.frontier_site else None,
        )
        for i, (key, site) in enumerate(zip(keys, g.sites, strict=True))
    ]
    return g.suffix(*inputs, *masks)
