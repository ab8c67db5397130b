"""Command line: `python -m service serve | models | predict` (typer)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from service.packaging import package

app = typer.Typer(add_completion=False, no_args_is_help=True, help="mcserve: MC dropout serving")


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="bind address")] = None,
    port: Annotated[int | None, typer.Option(help="TCP port")] = None,
    model_dir: Annotated[Path | None, typer.Option(help="model repository")] = None,
    log_level: Annotated[str | None, typer.Option(help="critical..debug")] = None,
) -> None:
    """Serve the model repository over HTTP (settings also from MCSERVE_* variables)."""
    from service.server import run

    overrides: dict[str, Any] = {
        k: v
        for k, v in {
            "host": host,
            "port": port,
            "model_dir": model_dir,
            "log_level": log_level,
        }.items()
        if v is not None
    }
    run(overrides)


@app.command("models")
def list_models(
    model_dir: Annotated[Path, typer.Option(help="model repository")] = Path("models"),
) -> None:
    """List the bundles found and whether each loads (and why not)."""
    from service.engine.registry import Registry
    from service.settings import Settings

    settings = Settings(model_dir=model_dir)
    reg = Registry.with_policy(model_dir, settings.trust_policy(), device="cpu")
    entries = reg.load_all()
    if not entries:
        typer.echo(f"no bundles under {model_dir}")
        raise typer.Exit(1)
    for e in entries:
        if e.model is not None:
            m = e.model.manifest
            status = f"ready  {m.task:<14} {e.model.digest[:19]}"
        else:
            status = f"FAILED {e.error}"
        typer.echo(f"{e.name:<16} {e.version:<6} {status}")
    if any(e.model is None for e in entries):
        raise typer.Exit(2)


@app.command()
def predict(
    model: Annotated[str, typer.Argument(help="model name")],
    instance: Annotated[str, typer.Option(help="one instance as JSON (array or object)")],
    samples: Annotated[int | None, typer.Option(help="MC passes")] = None,
    seed: Annotated[int | None, typer.Option(help="seed, for a replayable answer")] = None,
    confidence: Annotated[float | None, typer.Option(help="interval level in (0, 1)")] = None,
    mode: Annotated[str, typer.Option(help="mc or deterministic")] = "mc",
    model_dir: Annotated[Path, typer.Option(help="model repository")] = Path("models"),
    version: Annotated[str | None, typer.Option(help="model version")] = None,
) -> None:
    """Predict one instance with uncertainty and print the JSON answer."""
    from service.api.encode import response
    from service.api.native import to_params
    from service.api.schemas import PredictParameters
    from service.engine.inputs import to_array
    from service.engine.registry import Registry
    from service.errors import McServeError
    from service.settings import Settings

    settings = Settings(model_dir=model_dir)
    try:
        value = json.loads(instance)
    except json.JSONDecodeError as exc:
        typer.echo(f"error: --instance is not valid JSON: {exc}", err=True)
        raise typer.Exit(2) from None
    reg = Registry.with_policy(model_dir, settings.trust_policy(), device="cpu")
    reg.load_all()
    try:
        served = reg.get(model, version)
        params = to_params(
            PredictParameters(samples=samples, seed=seed, confidence=confidence, mode=mode),  # type: ignore[arg-type]
            served,
            settings.max_samples,
        )
        x = to_array([value], served.manifest.inputs, settings.max_instances)
        pred = served.predict(x, params)
    except McServeError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(response(served, pred), indent=2))


app.command("package")(package)


def main() -> None:
    app()
