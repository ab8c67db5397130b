"""Command line: `python -m service serve | models | predict | calibrate | evaluate | train`."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer

from service.audit.cli import app as audit_app
from service.packaging.cli import package
from service.training.cli import train

if TYPE_CHECKING:
    from service.settings import Settings

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
    # A wrong setting: one clear line, not a traceback; warnings go to the server's log.
    warnings = settings_or_exit(overrides, echo_warnings=False)
    run(overrides, warnings)


def settings_or_exit(
    overrides: dict[str, Any], serve: bool = True, echo_warnings: bool = True
) -> list[str]:
    """Exit 2 with each problem of the settings (MCSERVE_* variables and flags) on one line;
    return the warnings (e.g. a variable that is no setting), printed unless `echo_warnings`
    is off (`serve` logs them in its own format), and go on."""
    from service.settings_check import problems

    errors, warnings = problems(overrides, serve)
    for w in warnings if echo_warnings or errors else []:  # with errors: no log will say them
        typer.echo(f"warning: {w}", err=True)
    for e in errors:
        typer.echo(f"error: invalid settings: {e}", err=True)
    if errors:
        raise typer.Exit(2)
    return warnings


def read_settings(model_dir: Path | None) -> Settings:
    """`models`' and `predict`'s settings: a setting that does not parse is one line and exit 2.
    `model_dir` None, not Path("models"): a default there had always won over
    MCSERVE_MODEL_DIR."""
    from service.settings import Settings

    overrides: dict[str, Any] = {"model_dir": model_dir} if model_dir is not None else {}
    settings_or_exit(overrides, serve=False)
    return Settings(**overrides)


@app.command("models")
def list_models(
    model_dir: Annotated[
        Path | None, typer.Option(help="model repository (default: MCSERVE_MODEL_DIR, else models)")
    ] = None,
) -> None:
    """List the bundles found and whether each loads (and why not)."""
    from service.bundle.load import TrustPolicy
    from service.engine.registry import Registry

    settings = read_settings(model_dir)
    model_dir = settings.model_dir
    reg = Registry.with_policy(model_dir, TrustPolicy.from_settings(settings), device="cpu")
    entries = reg.load_all()
    if not entries:
        typer.echo(f"no bundles under {model_dir}")
        raise typer.Exit(1)
    # SERVED marks the version a request without one gets: the newest that loads.
    served = {e.name: e.version for e in entries if e.model is not None}
    w = max(16, *(len(e.name) for e in entries))  # names up to 64 characters: columns stay aligned
    typer.echo(f"{'MODEL':<{w}} {'VERSION':<8} {'SERVED':<6} {'STATUS':<6} {'TASK':<14} DIGEST")
    for e in entries:
        mark = "*" if served.get(e.name) == e.version else ""
        if e.model is not None:
            m = e.model.manifest
            status = f"ready  {m.task:<14} {e.model.digest[:19]}"
        else:
            status = f"FAILED {e.error}"
        typer.echo(f"{e.name:<{w}} {e.version:<8} {mark:<6} {status}")
    if any(e.model is None for e in entries):
        raise typer.Exit(2)


@app.command()
def predict(
    model: Annotated[str, typer.Argument(help="model name")],
    instance: Annotated[
        str | None, typer.Option(help="one instance as JSON (array or object)")
    ] = None,
    text: Annotated[str | None, typer.Option(help="text models: one text to classify")] = None,
    audio: Annotated[Path | None, typer.Option(help="audio models: one WAV file")] = None,
    samples: Annotated[
        str | None, typer.Option(help="MC passes, or auto (adaptive, up to max_samples)")
    ] = None,
    tolerance: Annotated[float, typer.Option(help="samples=auto: see service.engine.adaptive")] = (
        0.01
    ),
    seed: Annotated[int | None, typer.Option(help="seed, for a replayable answer")] = None,
    confidence: Annotated[float | None, typer.Option(help="interval level in (0, 1)")] = None,
    mode: Annotated[str, typer.Option(help="mc or deterministic")] = "mc",
    model_dir: Annotated[
        Path | None, typer.Option(help="model repository (default: MCSERVE_MODEL_DIR, else models)")
    ] = None,
    version: Annotated[str | None, typer.Option(help="model version")] = None,
    dropout_sites: Annotated[
        str | None, typer.Option(help="'all' or k: sample the last k dropout sites")
    ] = None,
) -> None:
    """Predict one instance with uncertainty and print the JSON answer."""
    from pydantic import ValidationError

    from service.api.common.parameters import PredictParameters, to_params
    from service.bundle.load import TrustPolicy
    from service.encode import response
    from service.engine import adaptive
    from service.engine.clips import read_clip_file
    from service.engine.instances import encode_instances
    from service.engine.registry import Registry, whole
    from service.errors import InvalidInputError, McServeError

    settings = read_settings(model_dir)
    if sum(v is not None for v in (instance, text, audio)) != 1:
        typer.echo("error: give one of --instance JSON, --text TEXT or --audio FILE", err=True)
        raise typer.Exit(2)
    try:
        value = json.loads(instance) if instance is not None else text
    except json.JSONDecodeError as exc:
        typer.echo(f"error: --instance is not valid JSON: {exc}", err=True)
        raise typer.Exit(2) from None
    auto = samples == "auto"
    if dropout_sites not in (None, "all") and not whole(str(dropout_sites)):
        typer.echo(f"error: --dropout-sites {dropout_sites!r}: give all or a number k", err=True)
        raise typer.Exit(2)
    sites: int | Literal["all"] | None = None if dropout_sites is None else "all"
    if dropout_sites not in (None, "all"):
        sites = int(str(dropout_sites))
    if samples is not None and not auto and not whole(samples):
        typer.echo(f"error: --samples {samples!r}: give a number of passes or auto", err=True)
        raise typer.Exit(2)
    reg = Registry.with_policy(
        settings.model_dir, TrustPolicy.from_settings(settings), device="cpu"
    )
    reg.load_model(model)
    try:
        served = reg.get(model, version)
        params = to_params(
            PredictParameters(
                samples="auto" if auto else None if samples is None else int(samples),
                tolerance=tolerance if auto else None,
                seed=seed,
                confidence=confidence,
                mode=mode,  # type: ignore[arg-type]
                dropout_sites=sites,
            ),
            served,
            settings.max_samples,
        )
        if audio is not None:  # a WAV file, read as calibrate reads one, sent as /v1 takes it
            if served.manifest.inputs.audio is None:
                raise InvalidInputError(f"--audio: model '{model}' is not an audio model")
            data = read_clip_file(audio, served.manifest.inputs.audio, "--audio")
            value = {"b64": base64.b64encode(data).decode("ascii")}
        encoded = encode_instances([value], served, 1)
        x, notes = encoded.x, encoded.notes
        if params.auto is not None:
            pred = adaptive.run(served, [x], [params], params.auto)[0]
        else:
            pred = served.predict(x, params)
        pred.input_notes = notes
    except McServeError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(2) from None
    except ValidationError as exc:  # --mode foo, --samples 1, --seed -1: a traceback before
        for e in exc.errors(include_url=False):
            flag = "--" + str(e["loc"][0]).replace("_", "-") if e["loc"] else "a value"
            typer.echo(f"error: {flag}: {e['msg']}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(response(served, pred), indent=2))


app.command("package")(package)
app.add_typer(audit_app, name="audit")


@app.command()
def calibrate(
    bundle: Annotated[Path, typer.Argument(help="bundle directory to calibrate (left untouched)")],
    data: Annotated[Path, typer.Option(help="CSV: the manifest's feature names and the target")],
    out: Annotated[Path, typer.Option(help="model repository: writes OUT/<name>/<version>/")],
    samples: Annotated[int | None, typer.Option(help="MC passes (default: the model's)")] = None,
    seed: Annotated[int, typer.Option(help="mask seed")] = 0,
    version: Annotated[str | None, typer.Option(help="new version (default: next integer)")] = None,
    percentile: Annotated[
        float, typer.Option(help="referral: the triggers together refer 100 - this % of the rows")
    ] = 90.0,
    min_nll_temperature: Annotated[
        bool, typer.Option(help="classifiers: plain NLL minimiser, not the one-SE rule")
    ] = False,
    target: Annotated[
        str | None,
        typer.Option(help="the target column (default: 'target', else the model's target name)"),
    ] = None,
    method: Annotated[
        str,
        typer.Option(
            help="classifiers: temperature (one T), vector (per-class scale and bias) or auto "
            "(the lower 5-fold cross-validated NLL of the two)"
        ),
    ] = "temperature",
) -> None:
    """Calibrate a bundle (conformal scores, temperature or vector scaling, referral) into a new
    version."""
    from service.calibration.recalibration import calibrate_bundle
    from service.calibration.selection import describe
    from service.engine.conformal import quantile
    from service.errors import McServeError

    try:
        res = calibrate_bundle(
            bundle,
            data,
            out,
            samples=samples,
            seed=seed,
            version=version,
            percentile=percentile,
            one_se=not min_nll_temperature,
            target=target,
            method=method,
        )
    except (McServeError, OSError) as exc:
        typer.echo(f"error: {getattr(exc, 'message', exc)}", err=True)
        raise typer.Exit(2) from None
    cal, m = res.manifest.calibration, res.manifest
    assert cal is not None and m.referral is not None
    # A multi-output regressor keeps one score list per target (cal.scores is then empty).
    lists = list(cal.target_scores.values()) if cal.target_scores else [cal.scores]
    qs = "; ".join(
        ", ".join(f"{lv:g}: {quantile(scores, lv):.4g}" for lv in (0.8, 0.9, 0.95, 0.99))
        for scores in lists
    )
    typer.echo(f"wrote {res.path} (version {m.version}, from {cal.source.get('version')})")
    typer.echo(f"  {cal.n} rows, {cal.samples} passes, seed {cal.seed}; conformal q {qs}")
    if cal.temperature is not None:
        for line in describe(cal):
            typer.echo(f"  {line}")
    typer.echo(f"  referral: {m.referral.model_dump(exclude={'derived_from'})}")
    for w in res.warnings:
        typer.echo(f"warning: {w}", err=True)


@app.command()
def evaluate(
    bundle: Annotated[Path, typer.Argument(help="bundle directory to evaluate")],
    data: Annotated[Path, typer.Option(help="CSV: the manifest's feature names and the target")],
    out: Annotated[Path, typer.Option(help="report directory (report.md, report.json, PNGs)")],
    samples: Annotated[int | None, typer.Option(help="MC passes (default: the model's)")] = None,
    seed: Annotated[int, typer.Option(help="mask seed")] = 0,
    target: Annotated[
        str | None,
        typer.Option(help="the target column (default: 'target', else the model's target name)"),
    ] = None,
) -> None:
    """Evaluate a bundle on labelled rows: Markdown + JSON report with plots."""
    from service.bundle.load import load_bundle
    from service.calibration import report
    from service.calibration.data import read
    from service.calibration.evaluation import evaluate as run_evaluation
    from service.engine.model import ServedModel
    from service.errors import McServeError

    try:
        served = ServedModel(load_bundle(bundle), device="cpu")
        rows = read(data, served.manifest, target, served.bundle.tokenizer)
        # `is None`, not `or`: --samples 0 had silently run the model's default passes.
        passes = samples if samples is not None else served.manifest.defaults.samples
        ev = run_evaluation(served, rows, samples=passes, seed=seed)
        files = report.write(ev, out)
    except (McServeError, OSError) as exc:
        typer.echo(f"error: {getattr(exc, 'message', exc)}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote {', '.join(str(f) for f in files)}")
    for w in ev.numbers["overlap_warnings"]:
        typer.echo(f"warning: {w}", err=True)


app.command("train")(train)


def main() -> None:
    app()
