"""Find the held-out evaluation of a served bundle: what `python -m service evaluate` wrote.

A report is used only when its `model.digest` is the served bundle's digest: a report of another
version (or of the same version before it was rebuilt) would describe a different model. The
report is data from a file like a manifest: sized before it is read, read as JSON only, and every
string in it is escaped where a page shows it.

A report any way unreadable (not JSON, nested deeper than a report is: 1,000 brackets in 2 kB
made json.loads raise RecursionError and the page a 500) is no report. What a page shows of one
is worked out once per (path, inode, ctime, mtime, size) and kept (its strings cut as a page
cuts them): a 4 MB report of a million warnings was
parsed on every view, and drawn whole (a 24 MB page). A page shows the first MAX_SHOWN_ROWS
warnings and headline rows and says how many more there are.
"""

from __future__ import annotations

import json
import stat
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.api.common.html import MAX_SHOWN, number

MAX_REPORT_BYTES = 4 * 1024 * 1024
MAX_DEPTH = 32  # `evaluate` writes 4 levels; deeper is no report (and str() of it may recurse)
MAX_SHOWN_ROWS = 50  # warnings, and headline rows, a page shows of one report
MAX_VALUES = 64  # numbers shown of a per-class list (class_scale, class_bias)
# A file changed less than this long ago may change again within its ctime's resolution (a few
# ms) at the same size: what was read of it is not kept, so a rewrite is never missed.
SETTLE_S = 2.0
CACHE_ENTRIES = 256  # places looked in: two per served model
# The plots `evaluate` draws (service/calibration/report.py): file stem -> what it shows.
PLOTS = {
    "reliability": "Reliability diagram: accuracy against confidence",
    "coverage": "Interval coverage against the nominal level",
    "risk_coverage": "Risk-coverage: error rate of the most confident rows",
}
MAX_PLOT_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class Report:
    """What a page shows of a report.json, as text (the report itself is not kept)."""

    digest: Any  # its model.digest, or None
    samples: str
    seed: str
    headline: list[tuple[str, str]]
    rows_left_out: int  # headline rows past MAX_SHOWN_ROWS
    warnings: list[str]
    warnings_left_out: int


@dataclass(frozen=True)
class Evaluation:
    directory: Path
    report: Report
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
_cache: OrderedDict[Path, tuple[tuple[int, int, int, int], Report | None]] = OrderedDict()
_lock = threading.Lock()  # pages look reports up on worker threads


def _depth(value: Any) -> int:
    """How deeply lists and objects nest in a parsed JSON value (without recursion)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict | list):
            if d > deepest:
                deepest = d
                if deepest > MAX_DEPTH:
                    break
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


def _scalar(v: Any) -> str:
    """A report's count or seed as text; anything but a number is '?'."""
    return str(v) if isinstance(v, int | float) and not isinstance(v, bool) else "?"


def _parse(raw: bytes) -> Report | None:
    try:
        report = json.loads(raw)
    except (ValueError, RecursionError):  # not JSON (or not UTF-8), or nested past the stack
        return None
    if not isinstance(report, dict) or _depth(report) > MAX_DEPTH:
        return None
    model = report.get("model")
    rows, said = headline(report), warnings(report)
    return Report(
        digest=model.get("digest") if isinstance(model, dict) else None,
        samples=_scalar(report.get("samples")),
        seed=_scalar(report.get("seed")),
        headline=rows[:MAX_SHOWN_ROWS],
        rows_left_out=max(0, len(rows) - MAX_SHOWN_ROWS),
        warnings=said[:MAX_SHOWN_ROWS],
        warnings_left_out=max(0, len(said) - MAX_SHOWN_ROWS),
    )


def _report(path: Path) -> Report | None:
    """The report at `path` (None: none, too large, or not one), read again only when its
    inode, ctime, mtime or size changed."""
    try:
        st = path.stat()
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_REPORT_BYTES:
        return None
    # ctime too: a copy that keeps its mtime and size (cp -p, rsync -a) changes it, and utime
    # cannot set it. The inode: a file replaced by another (os.replace).
    key = (st.st_ino, st.st_ctime_ns, st.st_mtime_ns, st.st_size)
    with _lock:
        kept = _cache.get(path)
        if kept is not None and kept[0] == key:
            _cache.move_to_end(path)  # least recently used goes first
            return kept[1]
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_REPORT_BYTES + 1)
    except OSError:
        return None
    if len(raw) > MAX_REPORT_BYTES:  # grown since its size was read
        return None
    report = _parse(raw)
    if time.time() - st.st_ctime_ns / 1e9 >= SETTLE_S:  # ctime: an mtime may be set ahead
        with _lock:
            _cache[path] = (key, report)
            _cache.move_to_end(path)
            while len(_cache) > CACHE_ENTRIES:
                _cache.popitem(last=False)
    return report


def _read(directory: Path, digest: str) -> Evaluation | None:
    report = _report(directory / "report.json")
    if report is None or report.digest != digest:
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
    return [str(w)[: MAX_SHOWN + 1] for w in _list(report.get("warnings"))]  # a page cuts more


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
                shown = ", ".join(number(v) for v in values[:MAX_VALUES])
                more = f" and {len(values) - MAX_VALUES:,} more" if len(values) > MAX_VALUES else ""
                rows.append((key.replace("_", " "), shown + more))
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
    return [(what, value[: MAX_SHOWN + 1]) for what, value in rows]  # kept as a page shows it


def _list(v: Any) -> list[Any]:
    """A report's list, or none: a report is data, and 5 where a list belongs is no list."""
    return v if isinstance(v, list) else []
