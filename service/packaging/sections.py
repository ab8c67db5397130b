"""The manifest sections `save` builds from its arguments, and its one-line refusals.

Split from writer.py (which stays the order of the work); each returns a section or raises a
ModelError the writer's user can act on.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from pydantic import ValidationError
from torch import nn

from service.bundle.manifest import Aleatoric, Variance
from service.bundle.spec import OutputSpec, TargetSpec
from service.errors import ModelError


@contextmanager
def manifest_errors() -> Iterator[None]:
    """A manifest section pydantic refuses, as one line (not a validation traceback)."""
    try:
        yield
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise ModelError(
            f"the bundle's manifest would be invalid at '{loc}': {first['msg']}"
        ) from None


def vocabulary(gm: torch.fx.GraphModule) -> int:
    """The smallest vocabulary among the embeddings that read the input ids directly."""
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    sizes = [
        int(m.num_embeddings)
        for n in gm.graph.nodes
        if n.op == "call_module"
        and isinstance(m := gm.get_submodule(str(n.target)), nn.Embedding)
        and n.args[:1] == tuple(inputs[:1])
    ]
    if not sizes:
        raise ModelError("an integer example_input must be read by an nn.Embedding (token ids)")
    return int(min(sizes))


def aleatoric(noise_var: float | None, variance: Variance | None) -> Aleatoric:
    if variance is not None:
        return Aleatoric(kind="heteroscedastic", parameterisation=variance)
    if noise_var:
        return Aleatoric(kind="homoscedastic", noise_var=noise_var)
    return Aleatoric()


def outputs_of(names: list[str], units: str | Sequence[str | None] | None) -> OutputSpec:
    if len(names) == 1:
        if units is not None and not isinstance(units, str):
            raise ModelError("target_unit is one unit (a string) for a single target")
        return OutputSpec(target=names[0], unit=units)
    unit_list = [None] * len(names) if units is None else units
    if isinstance(unit_list, str) or len(unit_list) != len(names):
        raise ModelError(f"target_unit must list one unit (or None) per target: {len(names)}")
    if len(set(names)) != len(names):
        raise ModelError(f"target names must be distinct, got {names}")
    return OutputSpec(
        targets=[TargetSpec(name=n, unit=u) for n, u in zip(names, unit_list, strict=True)]
    )
