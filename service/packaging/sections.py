"""The manifest sections `save` builds from its arguments, and its one-line refusals.

Split from writer.py (which stays the order of the work); each returns a section or raises a
ModelError the writer's user can act on.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from service.bundle.manifest import Aleatoric, Variance
from service.bundle.spec import OutputSpec, TargetSpec
from service.bundle.vocabulary import check_vocabulary, embedding_rows
from service.bundle.weights import check_finite
from service.errors import BundleError, ModelError


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
    rows = embedding_rows(gm)
    if rows is None:
        raise ModelError("an integer example_input must be read by an nn.Embedding (token ids)")
    return rows[1]


def check_weights(state: dict[str, torch.Tensor], parameters: Collection[str]) -> None:
    """A weight that is not finite, refused before writing (the loader refuses it too)."""
    try:
        check_finite(state, "the module's weights", parameters)
    except BundleError as exc:  # the module given to save is the cause
        raise ModelError(exc.message) from None


def check_ids(
    rebuilt: nn.Module, value_range: tuple[float, float] | None, tokenizer: Any, pad_id: int | None
) -> None:
    """An id the tokenizer makes, or value_range allows, that the embedding has no row for,
    refused before writing (the loader refuses it too)."""
    try:
        check_vocabulary(rebuilt, value_range, tokenizer, pad_id, "save")
    except BundleError as exc:  # the model or tokenizer given to save is the cause
        raise ModelError(exc.message) from None


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
