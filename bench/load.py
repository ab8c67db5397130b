"""HTTP load benchmark: requests/s, p50 and p99 from wrk (its own process) on 127.0.0.1.

    python -m bench.load [--repeats 5] [--duration 5] [--models breast-cancer digits]
                         [--concurrency 1 16 64] [--samples 100] [--out bench/results/load.json]
                         (a model may be name@version: that version instead of the newest)
                         [--baseline-tree DIR]

For each model it measures, interleaved in each repeat: (a) the echo endpoint (bench/echo.py,
same uvicorn settings, no middleware, parses the same request model, fixed small JSON: the
HTTP ceiling), (b) mcserve with batching off, (c) mcserve with batching on, (d) mcserve with
batching on and the compute on a thread of the server instead of the compute process (the
default until 2026-11-27). Medians of the repeats. Every server is a real process on
127.0.0.1, stopped by its own PID.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.common import machine, now

ROOT = Path(__file__).resolve().parents[1]
LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = io.open("{body}"):read("*a")
"""


def instance(model: str) -> object:
    name = model.split("@")[0]  # "name@version": a version's rows are its name's
    with (ROOT / "models" / "data" / f"{name}-test.csv").open() as f:
        row = next(csv.DictReader(f))
    row.pop("target")
    if list(row) == ["text"]:  # a text model (medical-abstracts): the instance is the string
        return row["text"]
    values = [float(v) for v in row.values()]
    if name == "digits":
        return [[values[r * 8 : r * 8 + 8] for r in range(8)]]
    return values


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(
    kind: str,
    env: dict[str, str],
    cmd: list[str] | None = None,
    model_dir: Path | None = None,
    cwd: Path = ROOT,
) -> tuple[subprocess.Popen[bytes], int]:
    """Start a server process on a free port (appended to `cmd` as --port N) and wait for it.

    mcserve serves `model_dir` (default: the bundled models); a flag, so it wins over any
    MCSERVE_MODEL_DIR in `env`. `cwd`: where it runs (another checkout runs its own code).
    """
    port = free_port()
    if cmd is not None:
        cmd = [*cmd, "--port", str(port)]
    elif kind == "echo":
        cmd = [sys.executable, "-m", "bench.echo", "--port", str(port)]
    else:
        cmd = [
            sys.executable,
            "-m",
            "service",
            "serve",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--model-dir",
            str(model_dir or ROOT / "models"),
        ]
    # A session of its own: stop() ends the server and any workers it spawned (LitServe does).
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc, port
        except httpx.TransportError:
            pass
        time.sleep(0.05)  # a finer poll than 0.2 s: bench/start.py times the start itself
    stop(proc)
    raise RuntimeError(f"{kind} did not become ready")


def stop(proc: subprocess.Popen[bytes]) -> None:
    """End the server's whole process group (its own PID is the group id)."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    assert m, text
    v, unit = float(m.group(1)), m.group(2)
    return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v


def wrk(
    port: int, model: str, body_file: str, conc: int, duration: int, path: str | None = None
) -> dict[str, float]:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(LUA.format(body=body_file))
    name, _, version = model.partition("@")  # "name@version": that version, not the newest
    route = (
        f"/v1/models/{name}/versions/{version}:predict" if version else f"/v1/models/{name}:predict"
    )
    url = f"http://127.0.0.1:{port}{path or route}"
    out = subprocess.run(
        ["wrk", "-t1", f"-c{conc}", f"-d{duration}s", "--latency", "-s", script.name, url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    os.unlink(script.name)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = int(non2xx.group(1)) if non2xx else 0
    return {"rps": rps, "p50_ms": p50, "p99_ms": p99, "errors": errors}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument(
        "--models", nargs="+", default=["breast-cancer", "digits"],
        help="model names; name@version for a version other than the newest",
    )  # fmt: skip
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 16, 64])
    ap.add_argument("--samples", nargs="+", type=int, default=[100])
    ap.add_argument("--variants", nargs="+", default=["echo", "off", "on", "thread"])
    ap.add_argument("--out", default=None)
    ap.add_argument(
        "--baseline-tree",
        type=Path,
        default=None,
        help="another checkout (e.g. a worktree of an earlier commit): its own code and models "
        "serve as the variant 'baseline' (batching on), interleaved with the others",
    )
    args = ap.parse_args()
    envs = {
        "echo": {},
        "off": {"MCSERVE_BATCHING": "false"},
        "on": {},
        "torch-masks": {"MCSERVE_FUSED_MASKS": "false"},  # batching on, masks by torch ops
        "thread": {"MCSERVE_COMPUTE_PROCESS": "false"},  # batching on, compute on a thread
    }
    servers = {v: start(v, envs[v]) for v in args.variants}
    if args.baseline_tree is not None:
        tree = args.baseline_tree.resolve()
        # Its own code: run from there, and nothing of this checkout on its path.
        env = {"PYTHONPATH": str(tree)}
        servers["baseline"] = start("baseline", env, model_dir=tree / "models", cwd=tree)
        args.variants.append("baseline")
    results: dict[str, list[dict[str, float]]] = {}
    try:
        bodies = {}
        for model in args.models:
            for t in args.samples:
                with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
                    json.dump({"instances": [instance(model)], "parameters": {"samples": t}}, f)
                bodies[(model, t)] = f.name
        for rep in range(args.repeats):
            for (model, t), body in bodies.items():
                for c in args.concurrency:
                    for v in args.variants:  # interleaved: noise hits every variant alike
                        r = wrk(servers[v][1], model, body, c, args.duration)
                        results.setdefault(f"{model}|{t}|{c}|{v}", []).append(r)
                        print(rep, model, t, c, v, r, flush=True)
    finally:
        for proc, _ in servers.values():
            stop(proc)
    summary = {}
    for key, runs in results.items():
        summary[key] = {m: round(statistics.median(r[m] for r in runs), 2) for m in runs[0]}
    report = {
        "machine": machine(),
        "date": now(),
        "repeats": args.repeats,
        "duration_s": args.duration,
        "median": summary,
    }
    print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
