"""Find the held-out evaluation of a served bundle: what `python -m service evaluate` wrote.

A report is used only when its `model.digest` is the served bundle's digest: a report of another
version (or of the same version before it was rebuilt) would describe a different model. The
report is data from a file like a manifest: sized before it is read, read as JSON only, and every
string in it is escaped where a page shows it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.api.common.html import number

MAX_REPORT_BYTES = 4 * 1024 * 1024
# The plots `evaluate` draws (service/calibration/report.py): file stem -> what it shows.
PLOTS = {
    "reliability": "Reliability diagram: accuracy against confidence",
    "coverage": "Interval coverage against the nominal level",
    "risk_coverage": "Risk-coverage: error rate of the most confident rows",
}
MAX_PLOT_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class Evaluation:
    directory: Path
    report: dict[str, Any]
    plots: list[str] = field(default_factory=list)  # stems of PLOTS present, in that order

    def plot_path(self, stem: str) -> Path | None:
        if stem not in self.plots:  # an allow-list: the URL never names a file by itself
            return None
        path = self.directory / f"{stem}.png"
        try:  # served as image/png: only what is one (an HTML file under the name was served)
            with path.open("rb") as fh:
                return path if fh.read(8) == PNG_SIGNATURE else None
        except OSError:
            return None


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _read(directory: Path, digest: str) -> Evaluation | None:
    path = directory / "report.json"
    try:
        if not path.is_file() or path.stat().st_size > MAX_REPORT_BYTES:
            return None
        report = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    model = report.get("model") if isinstance(report, dict) else None
    if not isinstance(model, dict) or model.get("digest") != digest:
        return None
    plots = []
    for stem in PLOTS:
        png = directory / f"{stem}.png"
        try:
            if png.is_file() and png.stat().st_size <= MAX_PLOT_BYTES:
                plots.append(stem)
        except OSError:
            continue
    return Evaluation(directory, report, plots)


def find(bundle: Path, name: str, digest: str, evaluation_dir: Path | None) -> Evaluation | None:
    """The bundle's own `evaluation/` folder first, then `<evaluation_dir>/<name>/`."""
    places = [bundle / "evaluation"]
    if evaluation_dir is not None:
        places.append(evaluation_dir / name)  # name matches the manifest's grammar: no "/"
    for place in places:
        found = _read(place, digest)
        if found is not None:
            return found
    return None


def warnings(report: dict[str, Any]) -> list[str]:
    return [str(w) for w in _list(report.get("warnings"))]


def headline(report: dict[str, Any]) -> list[tuple[str, str]]:
    """The few numbers a reader looks at first, as (what, value) text, from either task."""
    rows: list[tuple[str, str]] = []
    data = report.get("data")
    if isinstance(data, dict) and isinstance(data.get("rows"), int):
        rows.append(("test rows", f"{data['rows']} ({data.get('file', 'unnamed file')})"))
    served = report.get("served")
    if isinstance(served, dict):  # classification
        for key in ("accuracy", "nll", "brier", "ece"):
            rows.append((key if key != "nll" else "NLL", number(served.get(key))))
        rows.append(("temperature", number(report.get("temperature"))))
        for key in ("class_scale", "class_bias"):  # vector scaling, when the bundle has it
            values = report.get(key)
            if isinstance(values, list):
                rows.append((key.replace("_", " "), ", ".join(number(v) for v in values)))
        for s in _list(report.get("prediction_sets")):
            if isinstance(s, dict) and s.get("level") == 0.95:
                rows.append(("prediction-set coverage at 95 %", number(s.get("coverage"))))
    else:  # regression
        for key in ("rmse", "mae", "mean_log_likelihood", "mean_std"):
            if key in report:
                rows.append((key.replace("_", " "), number(report.get(key))))
        intervals = report.get("intervals")
        if isinstance(intervals, dict):
            for method, levels in intervals.items():
                for row in levels if isinstance(levels, list) else []:
                    if isinstance(row, dict) and row.get("level") == 0.95:
                        rows.append((f"{method} coverage at 95 %", number(row.get("coverage"))))
    referral = report.get("referral")
    if isinstance(referral, dict):
        rows.append(("referred", number(referral.get("rate"))))
    return rows


def _list(v: Any) -> list[Any]:
    """A report's list, or none: a report is data, and 5 where a list belongs is no list."""
    return v if isinstance(v, list) else []
