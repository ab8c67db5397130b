"""Head-to-head: mcserve vs LitServe vs the plain loop, same weights, T, load generator and run.

    bash bench/peers/setup.sh            # once: the peers' own virtual environment
    python -m bench.peers.run [--repeats 3] [--duration 5] [--models breast-cancer digits]

Each peer serves one model (PEER_MODEL); LitServe is measured with torch's default threads and
with OMP_NUM_THREADS=1 and the better counts. Requests/s, p50, p99 at concurrency 1, 16, 64;
medians of the repeats, interleaved so that machine noise hits every server alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from bench.common import machine, now
from bench.load import ROOT, instance, start, stop, wrk

PEER_PY = str(ROOT / "bench" / "peers" / ".venv" / "bin" / "python")


def servers(model: str) -> dict[str, tuple[list[str] | None, dict[str, str], str | None]]:
    env = {"PEER_MODEL": model}
    lit = [PEER_PY, str(ROOT / "bench" / "peers" / "litserve_app.py")]
    loop = [PEER_PY, str(ROOT / "bench" / "peers" / "loop_app.py")]
    return {
        "mcserve": (None, {}, None),
        "litserve": (lit, env, "/predict"),
        "litserve-omp1": (lit, {**env, "OMP_NUM_THREADS": "1"}, "/predict"),
        "plain-loop": (loop, env, "/predict"),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--models", nargs="+", default=["breast-cancer", "digits"])
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 16, 64])
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    results: dict[str, list[dict[str, float]]] = {}
    for model in args.models:
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump({"instances": [instance(model)], "parameters": {"samples": args.samples}}, f)
        running = {}
        try:
            for name, (cmd, env, _) in servers(model).items():
                running[name] = start(name, env, cmd)
            for rep in range(args.repeats):
                for c in args.concurrency:
                    for name, (_, _, path) in servers(model).items():
                        r = wrk(running[name][1], model, f.name, c, args.duration, path)
                        results.setdefault(f"{model}|{c}|{name}", []).append(r)
                        print(rep, model, c, name, r, flush=True)
        finally:
            for proc, _ in running.values():
                stop(proc)
    med = {
        k: {m: round(statistics.median(r[m] for r in runs), 2) for m in runs[0]}
        for k, runs in results.items()
    }
    report = {"machine": machine(), "date": now(), "repeats": args.repeats, "median": med}
    print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
