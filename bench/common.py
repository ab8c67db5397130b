"""Shared helpers for benchmarks: machine description and robust summaries."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def children(pid: int) -> list[int]:
    """PIDs of a process's running children (a server's compute process, its audit writer)."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue  # exited meanwhile
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(d.name))
    return found


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu}, {n} CPUs, Python {platform.python_version()}"


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


def timed(fn: Callable[[], object], repeat: int = 1) -> float:
    """Seconds per call of fn, over `repeat` back-to-back calls."""
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def write_report(out: Path, stem: str, res: dict[str, Any], text: str) -> None:
    """`<out>/<stem>.json` (the results, sorted) and `<out>/<stem>.md` (`text`), and print it."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")
    (out / f"{stem}.md").write_text(text)
    print(text)


def fresh_process_arms(
    module: str, arms: dict[str, list[str]], repeats: int
) -> dict[str, list[dict[str, Any]]]:
    """Run `python -m <module> --child <args>` once per arm and repeat, interleaved, each in a
    fresh process (its peak RSS its own); the JSON each prints last, per arm."""
    root = Path(__file__).resolve().parent.parent
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in arms}
    for _ in range(repeats):
        for name, args in arms.items():
            cmd = [sys.executable, "-m", module, "--child", *args]
            out = subprocess.run(cmd, cwd=root, check=True, capture_output=True, text=True)
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    return runs
