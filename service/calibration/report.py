"""Write an evaluation as `report.md`, `report.json` (same numbers) and PNG plots.

matplotlib is imported here only, with the Agg backend (no display), so serving never needs it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from service.calibration.evaluation import Evaluation, finite_or_none
from service.calibration.metrics import Reliability


def _f(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return "∞" if np.isinf(v) else f"{v:.{digits}f}"
    return str(v)


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f} %"


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})  # no version string: stable bytes
    _plt().close(fig)


def _coverage_plot(curves: dict[str, Any], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    levels = curves["levels"]
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="ideal")
    for method, style in (("gaussian", "o-"), ("conformal", "s-")):
        if method in curves:
            ax.plot(levels, curves[method], style, markersize=3, label=method)
    ax.set(xlabel="nominal level", ylabel="observed coverage (PICP)", xlim=(0, 1), ylim=(0, 1))
    ax.set_title("interval coverage vs nominal")
    ax.legend()
    _save(fig, path)


def _reliability_plot(rel: dict[str, Reliability], path: Path) -> None:
    plt = _plt()
    fig, (ax, hist) = plt.subplots(
        2, 1, figsize=(4.5, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="ideal")
    first = rel[next(iter(rel))]
    centres = (first.edges[:-1] + first.edges[1:]) / 2
    for k, (name, r) in enumerate(rel.items()):
        m = r.count > 0
        ax.plot(
            r.confidence[m], r.accuracy[m], "o-", markersize=3, label=f"{name}, ECE {r.ece:.3f}"
        )
        width = (first.edges[1] - first.edges[0]) / (len(rel) + 1)
        hist.bar(centres + (k - 0.5) * width, r.count, width=width, label=name)
    ax.set(ylabel="accuracy", xlim=(0, 1.02), ylim=(-0.02, 1.02))
    ax.set_title(f"reliability ({len(first.count)} equal-width bins)")
    ax.legend(fontsize=8)
    hist.set(xlabel="confidence (top-class probability)", ylabel="rows", yscale="log")
    _save(fig, path)


def _risk_plot(rc: dict[str, tuple[np.ndarray, np.ndarray]], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, (cov, risk) in rc.items():
        ax.plot(cov, risk, label=f"{name} (AURC {risk.mean():.4f})")
    ax.set(xlabel="coverage (share of cases kept, least uncertain first)", ylabel="error rate")
    ax.set_title("risk-coverage")
    ax.legend(fontsize=8)
    _save(fig, path)


_SPREAD_NOTE = (
    "Expected ± sd: the mean and standard deviation of the coverage a correct split-conformal "
    "method shows on this many test rows, over calibration sets of the bundle's size "
    "(Beta-binomial; an ∞ threshold covers everything). A shortfall of one or two sd is "
    "consistent with sampling noise; it does not show miscalibration."
)


def _spread(row: dict[str, Any]) -> str:
    mean, sd = row.get("expected_coverage"), row.get("expected_coverage_sd")
    if mean is None or sd is None or not np.isfinite(mean):
        return "–"
    return f"{100 * mean:.1f} ± {100 * sd:.1f} %"


def _header(n: dict[str, Any]) -> list[str]:
    m, cal = n["model"], n["model"]["calibration"]
    lines = [
        f"# Evaluation: `{m['name']}` version {m['version']}",
        "",
        f"- bundle digest `{m['digest']}`, task {m['task']}",
        f"- data `{n['data']['file']}` ({n['data']['rows']} rows, sha256 "
        f"`{n['data']['sha256'][:16]}…`), {n['samples']} MC passes, mask seed {n['seed']}",
    ]
    if cal["calibrated"]:
        t = f", temperature {cal['temperature']:.4g}" if cal.get("temperature") else ""
        if cal.get("class_scale"):
            t += f", vector scaling ({_per_class(cal['class_scale'], cal['class_bias'])})"
        lines.append(
            f"- calibrated: split conformal on {cal['n']} rows with {cal['samples']} passes{t}"
        )
    else:
        lines.append("- not calibrated (no conformal intervals or sets)")
    warnings = n["overlap_warnings"] + n["warnings"]
    if warnings:
        lines += ["", "**Warnings**", ""] + [f"- {w}" for w in warnings]
    return lines


def _referral_lines(r: dict[str, Any], kind: str, policy: dict[str, Any]) -> list[str]:
    label = "RMSE" if kind == "rmse" else "error rate"
    fmt = _f if kind == "rmse" else _pct
    thresholds = ", ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
        for k, v in policy.items()
        if k != "derived_from" and v is not None
    )
    rates = r.get("trigger_rates", {})
    trig = ", ".join(
        f"{k} {v} ({_pct(rates[k])})" if k in rates else f"{k} {v}"
        for k, v in r["triggers"].items()
    )
    return [
        "## Referral",
        "",
        f"Policy: {thresholds} ({policy.get('derived_from') or 'manifest'}).",
        "",
        f"| referred | extrapolation | {label}, not referred | {label}, referred | {label}, all |",
        "|---|---|---|---|---|",
        f"| {_pct(r['rate'])} | {_pct(r['extrapolation_rate'])} | {fmt(r[f'{kind}_not_referred'])} "
        f"| {fmt(r[f'{kind}_referred'])} | {fmt(r[f'{kind}_all'])} |",
        "",
        f"Inputs referred by each trigger (one input can have several): {trig}.",
    ]


def _regression(n: dict[str, Any]) -> list[str]:
    iv = n["intervals"]
    methods = list(iv)
    cols = [f"{m} coverage | {m} mean width" for m in methods]
    if "conformal" in iv:
        cols.append("conformal: expected ± sd")
    lines = [
        "## Accuracy",
        "",
        "| RMSE | MAE | mean log-likelihood | mean std | mean epistemic std |",
        "|---|---|---|---|---|",
        f"| {_f(n['rmse'])} | {_f(n['mae'])} | {_f(n['mean_log_likelihood'])} "
        f"| {_f(n['mean_std'])} | {_f(n['mean_epistemic_std'])} |",
        "",
        f"Log-likelihood: {n['log_likelihood']}.",
        "",
        "## Intervals",
        "",
        f"| level | {' | '.join(cols)} |",
        "|---|" + "---|" * (2 * len(methods) + ("conformal" in iv)),
    ]
    for i, row in enumerate(iv[methods[0]]):
        cells = [f"{_pct(iv[m][i]['coverage'])} | {_f(iv[m][i]['mean_width'], 2)}" for m in methods]
        if "conformal" in iv:
            cells.append(_spread(iv["conformal"][i]))
        lines.append(f"| {row['level']:g} | {' | '.join(cells)} |")
    if "conformal" in iv:
        lines += ["", _SPREAD_NOTE]
    lines += ["", "![coverage vs nominal](coverage.png)", ""]
    return lines + _referral_lines(n["referral"], "rmse", n["model"]["referral"])


def _per_class(scale: list[float], bias: list[float]) -> str:
    return (
        "per class: scale "
        + ", ".join(f"{v:.4g}" for v in scale)
        + "; bias "
        + ", ".join(f"{v:+.4g}" for v in bias)
    )


def _ece_null(n: dict[str, Any]) -> str:
    e = n.get("ece_if_calibrated")
    if not e:  # reports written before it existed
        return ""
    return (
        f" A perfectly calibrated model with the served probabilities would show ECE "
        f"{e['mean']:.3f} ± {e['sd']:.3f} on these {e['rows']} rows (95th percentile "
        f"{e['p95']:.3f}; labels drawn from the probabilities, {e['draws']:.0f} times): ECE is "
        "biased upwards on a finite sample, so read the served ECE against that."
    )


def _classification(n: dict[str, Any]) -> list[str]:
    s, raw = n["served"], n["temperature_1"]
    vector = n.get("class_scale") is not None
    how = "vector scaling" if vector else f"T = {n['temperature']:.4g}"
    lines = [
        "## Accuracy and calibration",
        "",
        f"| | served ({how}) | T = 1 (as trained) |",
        "|---|---|---|",
    ]
    for k in ("accuracy", "nll", "brier", "ece"):
        lines.append(f"| {k} | {_f(s[k])} | {_f(raw[k])} |")
    lines.append(f"| macro-F1 | {_f(n['macro_f1'])} | |")
    if vector:
        lines += [
            "",
            f"Served with vector scaling, {_per_class(n['class_scale'], n['class_bias'])}.",
        ]
    le = n.get("lenient")
    if le is not None:
        lines += [
            "",
            f"Read leniently ({le['texts']} distinct texts; {le['rows_of_multi_label_texts']} rows "
            "belong to a text that appears more than once, possibly with other labels; a row "
            "counts as right when the prediction is any label of its text): accuracy "
            f"{_f(le['accuracy'])}, macro-F1 {_f(le['macro_f1'])}.",
        ]
    lines += [
        "",
        f"ECE over {n['ece_bins']} equal-width bins of the top-class probability.{_ece_null(n)}",
        "",
        "![reliability diagram](reliability.png)",
        "",
        f"## Uncertainty and errors ({n['errors']} errors)",
        "",
        "| score | AUROC for detecting errors | AURC |",
        "|---|---|---|",
    ]
    for k, v in n["error_detection_auroc"].items():
        lines.append(f"| {k} | {_f(v)} | {_f(n['aurc'][k])} |")
    lines += ["", "![risk-coverage](risk_coverage.png)", ""]
    if n["prediction_sets"]:
        lines += [
            "## Conformal prediction sets",
            "",
            "| level | coverage | expected ± sd | mean size | empty | one label |",
            "|---|---|---|---|---|---|",
        ]
        for ps in n["prediction_sets"]:
            lines.append(
                f"| {ps['level']:g} | {_pct(ps['coverage'])} | {_spread(ps)} "
                f"| {_f(ps['mean_size'], 3)} | {_pct(ps['empty'])} | {_pct(ps['singleton'])} |"
            )
        lines += ["", _SPREAD_NOTE, ""]
    return lines + _referral_lines(n["referral"], "error_rate", n["model"]["referral"])


def write(ev: Evaluation, out: Path | str) -> list[Path]:
    """Write the report files into ``out`` (created); returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n = ev.numbers
    files = [out / "report.md", out / "report.json"]
    if n["model"]["task"] == "regression":
        body = _regression(n)
        _coverage_plot(ev.curves, out / "coverage.png")
        files.append(out / "coverage.png")
    else:
        body = _classification(n)
        _reliability_plot(ev.curves["reliability"], out / "reliability.png")
        _risk_plot(ev.curves["risk_coverage"], out / "risk_coverage.png")
        files += [out / "reliability.png", out / "risk_coverage.png"]
    text = "\n".join([*_header(n), "", *body, ""])
    files[0].write_text(text)
    payload = json.dumps(finite_or_none(n), indent=2, sort_keys=True, allow_nan=False)
    files[1].write_text(payload + "\n")
    return files
