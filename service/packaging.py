"""`python -m service package`: a bundle from a Python entry point plus a weights file."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Annotated

import torch
import typer
from safetensors.torch import load_file
from torch import nn

from service.bundle import save
from service.errors import McServeError


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
    valid_ranges: Annotated[str | None, typer.Option(help="JSON list of [lo, hi]")] = None,
    noise_var: Annotated[float | None, typer.Option(help="regression noise variance 1/tau")] = None,
    variance: Annotated[
        str | None,
        typer.Option(
            help="the model outputs [mean, noise parameter]: log_variance or softplus_std"
        ),
    ] = None,
) -> None:
    """Write <out>/<name>/<version>/ from your model's factory and trained weights."""
    module = load_factory(factory)
    module.load_state_dict(load_weights(weights))
    shape = [int(v) for v in input_shape.split(",")]
    example = torch.zeros(2, *shape)
    try:
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
            valid_ranges=json.loads(valid_ranges) if valid_ranges else None,
            noise_var=noise_var,
            variance=variance,  # type: ignore[arg-type]
        )
    except McServeError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(2) from None
    typer.echo(str(dest))
