"""Server CPU per request under load: where the HTTP ceiling and mcserve's cost come from.

    python -m bench.cost [--models breast-cancer digits] [--rounds 5] [--duration 4]
                         [--concurrency 64] [--baseline-tree DIR] [--out FILE.json]

Servers, all up at once and hit in a random order each round (wrk in its own process, one
instance per request, T = 100): `raw` (a bare ASGI app under the same uvicorn settings that
parses the same request model: uvicorn's own floor), `echo` (bench/echo.py: FastAPI, the
ceiling the HTTP targets are set against), `mcserve` (this tree), `thread` (this tree with the
compute on a thread of the server: MCSERVE_COMPUTE_PROCESS=false) and, with --baseline-tree,
mcserve from another checkout (e.g. `git worktree add /tmp/base <commit>`). For each: requests/s,
p99, and the server's CPU time (all its threads and its compute process, user + system, from
/proc) per request. Medians.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import children, machine, now
from bench.load import instance, start, stop, wrk

TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process, all threads, and of its running children (the
    compute process)."""
    pids = [pid, *children(pid)]
    user = system = 0.0
    for p in pids:
        fields = _stat(p)
        user += int(fields[11]) / TICK
        system += int(fields[12]) / TICK
    return user, system


def servers(baseline: Path | None) -> dict[str, tuple[subprocess.Popen[bytes], int]]:
    up = {
        "raw": start("raw", {}, [sys.executable, "-m", "bench.echo", "--raw"]),
        "echo": start("echo", {}),
        "mcserve": start("on", {}),
        "thread": start("thread", {"MCSERVE_COMPUTE_PROCESS": "false"}),
    }
    if baseline is not None:
        cmd = [sys.executable, "-m", "service", "serve", "--log-level", "warning"]
        cmd += ["--model-dir", str(baseline / "models")]
        up["baseline"] = start("baseline", {}, cmd, cwd=baseline)  # its own code, from there
    return up


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["breast-cancer", "digits"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--baseline-tree", type=Path, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rng = random.Random(7)
    report: dict[str, object] = {"machine": machine(), "date": now()}
    report["args"] = {k: str(v) for k, v in vars(args).items()}
    medians: dict[str, dict[str, float]] = {}
    up = servers(args.baseline_tree)
    try:
        for model in args.models:
            with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
                json.dump({"instances": [instance(model)], "parameters": {"samples": 100}}, f)
            rows: dict[str, list[dict[str, float]]] = {name: [] for name in up}
            for _, port in up.values():  # warm each server up
                wrk(port, model, f.name, args.concurrency, 2)
            for r in range(args.rounds):
                order = list(up)
                rng.shuffle(order)
                for name in order:
                    proc, port = up[name]
                    u0, s0 = cpu_seconds(proc.pid)
                    res = wrk(port, model, f.name, args.concurrency, args.duration)
                    u1, s1 = cpu_seconds(proc.pid)
                    n = res["rps"] * args.duration
                    res |= {"cpu_us": 1e6 * (u1 - u0 + s1 - s0) / n, "sys_us": 1e6 * (s1 - s0) / n}
                    rows[name].append(res)
                    print(r, model, name, {k: round(v, 1) for k, v in res.items()}, flush=True)
            os.unlink(f.name)
            for name, rs in rows.items():
                medians[f"{model}|{name}"] = {k: statistics.median(x[k] for x in rs) for k in rs[0]}
    finally:
        for proc, _ in up.values():
            stop(proc)
    report["median"] = medians
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
