"""`python -m service package`: a bundle from a Python entry point plus a weights file."""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path
from typing import Annotated

import torch
import typer
from safetensors.torch import load_file
from torch import nn

from service.errors import InvalidInputError, McServeError
from service.packaging import save


def load_factory(spec: str) -> nn.Module:
    """'package.module:factory' -> the module the factory returns (the user's own code)."""
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise typer.BadParameter("expected 'module:factory', e.g. 'mypkg.nets:build'")
    sys.path.insert(0, str(Path.cwd()))
    factory = getattr(importlib.import_module(mod_name), attr)
    module = factory()
    if not isinstance(module, nn.Module):
        raise typer.BadParameter(f"{spec}() returned {type(module).__name__}, not an nn.Module")
    return module


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """safetensors, or a torch state dict loaded with weights_only=True (no arbitrary code)."""
    if path.suffix == ".safetensors":
        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise typer.BadParameter(f"{path} does not hold a state dict")
    return state


def _csv(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",")] if value else None


def _units(value: str | None) -> list[str | None] | None:
    """'mg/dL,,years' -> ['mg/dL', None, 'years']: an empty entry is a unitless feature."""
    return [v or None for v in _csv(value) or []] or None


def _ranges(value: str | None, flag: str) -> list[tuple[float, float]] | None:
    """A JSON list of [lo, hi] pairs, given inline or as the path of a .json file."""
    if not value:
        return None
    text = value
    if not value.lstrip().startswith("[") and Path(value).is_file():
        text = Path(value).read_text()
    try:
        pairs = json.loads(text)
        out = [(float(lo), float(hi)) for lo, hi in pairs]
    except (ValueError, TypeError) as exc:
        raise InvalidInputError(
            f"{flag}: give a JSON list with one [lo, hi] per feature, e.g. '[[0, 120], [0, 1]]', "
            f"or a .json file holding one ({exc})"
        ) from None
    return out


def example_input(
    shape: list[int], ranges: list[tuple[float, float]] | None, rows: int = 4
) -> torch.Tensor:
    """Seeded random inputs within the ranges when there is one per value (uniform; an open end:
    that far from the other, a half-normal), else standard normal. Not zeros: on zeros save's
    checks see little (an in-place ReLU of zeros changes nothing); within the ranges, a model
    taking sqrt or log of a non-negative feature is not handed negatives."""
    gen = torch.Generator().manual_seed(0)
    if not ranges or len(ranges) != math.prod(shape):
        return torch.randn(rows, *shape, generator=gen)
    lo, hi = torch.tensor(ranges, dtype=torch.float32).T
    u = torch.rand(rows, len(ranges), generator=gen)
    half = torch.randn(rows, len(ranges), generator=gen).abs()
    x = torch.where(lo.isfinite() & hi.isfinite(), lo + (hi - lo) * u, torch.zeros_like(u))
    x = torch.where(lo.isfinite() & ~hi.isfinite(), lo + half, x)
    x = torch.where(~lo.isfinite() & hi.isfinite(), hi - half, x)
    x = torch.where(~lo.isfinite() & ~hi.isfinite(), 2.0 * half * (u - 0.5).sign(), x)
    return x.view(rows, *shape)


# Square brackets are escaped: typer's help renders Rich markup, which swallowed "[lo, hi]".
_RANGES_HELP = r"JSON list of \[lo, hi] per feature, e.g. '[[0, 120], [0, 1]]', or a .json file"


def package(
    factory: Annotated[str, typer.Argument(help="module:factory returning the nn.Module")],
    weights: Annotated[Path, typer.Option(help=".safetensors or a state dict .pt")],
    input_shape: Annotated[str, typer.Option(help="per-instance shape, e.g. 30 or 1,8,8")],
    name: Annotated[str, typer.Option()],
    version: Annotated[str, typer.Option()],
    task: Annotated[str, typer.Option(help="classification or regression")],
    intended_use: Annotated[str, typer.Option()],
    out: Annotated[Path, typer.Option(help="model repository to write into")] = Path("models"),
    labels: Annotated[str | None, typer.Option(help="comma-separated class labels")] = None,
    target: Annotated[str | None, typer.Option(help="regression target name")] = None,
    feature_names: Annotated[str | None, typer.Option(help="comma-separated")] = None,
    valid_ranges: Annotated[
        str | None, typer.Option(help=f"hard: outside is refused (422). {_RANGES_HELP}")
    ] = None,
    noise_var: Annotated[float | None, typer.Option(help="regression noise variance 1/tau")] = None,
    units: Annotated[
        str | None, typer.Option(help="comma-separated, one per feature, e.g. mg/dL,,years")
    ] = None,
    training_ranges: Annotated[
        str | None,
        typer.Option(help=f"soft: outside is flagged as extrapolation. {_RANGES_HELP}"),
    ] = None,
    variance: Annotated[
        str | None,
        typer.Option(
            help="the model outputs [mean, noise parameter]: log_variance or softplus_std"
        ),
    ] = None,
    allow_train_noise: Annotated[
        bool,
        typer.Option(help="randomness only train mode has is training noise, not MC dropout"),
    ] = False,
) -> None:
    """Write <out>/<name>/<version>/ from your model's factory and trained weights."""
    module = load_factory(factory)
    module.load_state_dict(load_weights(weights))
    shape = [int(v) for v in input_shape.split(",")]
    try:
        train = _ranges(training_ranges, "--training-ranges")
        valid = _ranges(valid_ranges, "--valid-ranges")
        example = example_input(shape, train or valid)
        dest = save(
            module,
            example,
            out_dir=out,
            name=name,
            version=version,
            task=task,  # type: ignore[arg-type]
            intended_use=intended_use,
            labels=_csv(labels),
            target=target,
            feature_names=_csv(feature_names),
            units=_units(units),
            valid_ranges=valid,
            training_ranges=train,
            noise_var=noise_var,
            variance=variance,  # type: ignore[arg-type]
            train_noise="allow" if allow_train_noise else "refuse",
        )
    except McServeError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(2) from None
    typer.echo(str(dest))
