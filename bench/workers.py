"""Would more server processes close the HTTP gap? echo and mcserve with 1 and 2 uvicorn workers.

    python -m bench.workers [--repeats 3] [--duration 4] [--out FILE.json]

An experiment, not a supported mode: `python -m service serve` runs one process (metrics, audit
writer and drain are per process). Here mcserve's app factory runs under uvicorn's own
`--workers 2` (each process one compute thread, MCSERVE_THREADS=1), beside the echo endpoint under
the same settings with 1 and 2 workers and the normal one-process server; wrk at concurrency 64,
T = 100, variants interleaved (order reversed every other repeat), medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile

from bench.common import machine, now
from bench.load import instance, start, stop, wrk

UVICORN = [
    sys.executable,
    "-m",
    "uvicorn",
    "--loop",
    "uvloop",
    "--http",
    "httptools",
    "--no-access-log",
    "--log-level",
    "warning",
    "--host",
    "127.0.0.1",
]
VARIANTS: dict[str, tuple[list[str] | None, dict[str, str]]] = {
    "echo-1": ([*UVICORN, "bench.echo:app", "--workers", "1"], {}),
    "echo-2": ([*UVICORN, "bench.echo:app", "--workers", "2"], {}),
    "mcserve-1": (None, {}),  # python -m service serve, as bench.load runs it
    "mcserve-2": (
        [*UVICORN, "service.api.app:create_app", "--factory", "--workers", "2"],
        {"MCSERVE_MODEL_DIR": "models", "MCSERVE_THREADS": "1"},
    ),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--duration", type=int, default=4)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    servers = {k: start("mcserve", env, cmd) for k, (cmd, env) in VARIANTS.items()}
    rps: dict[str, list[float]] = {}
    try:
        for model in ("breast-cancer", "digits"):
            with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
                json.dump({"instances": [instance(model)], "parameters": {"samples": 100}}, f)
            for rep in range(args.repeats):
                order = list(servers) if rep % 2 == 0 else list(servers)[::-1]
                for k in order:
                    r = wrk(servers[k][1], model, f.name, 64, args.duration)
                    rps.setdefault(f"{model}|{k}", []).append(r["rps"])
                    print(rep, model, k, r, flush=True)
    finally:
        for proc, _ in servers.values():
            stop(proc)
    med = {k: round(statistics.median(v)) for k, v in rps.items()}
    ratios = {
        f"{m}|{k}_vs_{e}": round(med[f"{m}|{k}"] / med[f"{m}|{e}"], 3)
        for m in ("breast-cancer", "digits")
        for k in ("mcserve-1", "mcserve-2")
        for e in ("echo-1", "echo-2")
    }
    report = {"machine": machine(), "date": now(), "median_rps": med, "ratios": ratios}
    print(json.dumps(report, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
