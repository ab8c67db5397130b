"""What the audit trail costs: requests/s at concurrency 16, auditing off vs SQLite vs PostgreSQL.

    python -m bench.audit [--repeats 5] [--duration 10] [--concurrency 16] [--model breast-cancer]
                          [--postgres-url URL] [--baseline DIR] [--out bench/results/audit.json]

Three real `python -m service serve` processes on 127.0.0.1 (audit off; SQLite in a temporary
directory; PostgreSQL in a fresh schema of --postgres-url, default MCSERVE_TEST_POSTGRES_URL, see
.ci/postgres), measured with wrk in its own process, interleaved in every repeat so that noise
hits each variant alike; medians of the repeats. At the end each audited server is asked for
its count of 200 answers on the predict route, stopped with SIGTERM (its queue is flushed), and
the rows in its store are counted: they must be equal.

`--baseline DIR` adds `sqlite-baseline` (and `postgres-baseline`, in a schema of its own): the
`service` package of another checkout (e.g. `git worktree add /tmp/base HEAD~1`) auditing to the
same kind of store, for an A/B of an audit change in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shlex
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import httpx

from bench.common import machine, now
from bench.load import LUA, ROOT, instance, start

PREDICT_200 = re.compile(
    r'^mcserve_requests_total\{[^}]*route="/v1/models/\{name\}:predict"[^}]*status="200"[^}]*\}'
    r"\s+([0-9.e+]+)$",
    re.M,
)


def _ms(text: str) -> float:
    v, unit = float(re.sub(r"[a-z]+$", "", text)), re.sub(r"^[\d.]+", "", text)
    return {"us": v / 1000, "ms": v, "s": v * 1000, "m": v * 60_000}[unit]


def wrk(port: int, model: str, body_file: str, conc: int, duration: int) -> dict[str, float]:
    """One wrk run (its own process); percentiles read from the latency distribution lines."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(LUA.format(body=body_file))
    url = f"http://127.0.0.1:{port}/v1/models/{model}:predict"
    cmd = ["wrk", "-t1", f"-c{conc}", f"-d{duration}s", "--latency", "-s", script.name, url]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    os.unlink(script.name)

    def find(pattern: str) -> str:
        m = re.search(pattern, out, re.M)
        if m is None:
            raise RuntimeError(f"cannot read {pattern!r} from wrk's output:\n{out}")
        return m.group(1)

    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return {
        "rps": float(find(r"^Requests/sec:\s+([\d.]+)")),
        "p50_ms": _ms(find(r"^\s+50%\s+(\S+)$")),
        "p99_ms": _ms(find(r"^\s+99%\s+(\S+)$")),
        "requests": int(find(r"^\s+(\d+) requests in")),
        "errors": int(non2xx.group(1)) if non2xx else 0,
    }


def answered(port: int) -> int:
    """200 answers on the predict route, as the server itself counted them."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return int(sum(float(v) for v in PREDICT_200.findall(text)))


def stop_cleanly(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(120)


def count_rows(variant: str, settings: dict[str, str]) -> int:
    if "MCSERVE_AUDIT_PATH" in settings:
        with sqlite3.connect(settings["MCSERVE_AUDIT_PATH"]) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM audit_records").fetchone()[0])
    import psycopg

    with psycopg.connect(settings["MCSERVE_AUDIT_URL"]) as conn:
        row = conn.execute("SELECT COUNT(*) FROM audit_records").fetchone()
        return int(row[0]) if row else 0


def bracketed(timeline: list[tuple[str, float]], variants: list[str]) -> dict[str, float]:
    """Median over runs of 1 - rps / mean(nearest `off` before, nearest `off` after), in %."""
    offs = [i for i, (v, _) in enumerate(timeline) if v == "off"]
    ratios: dict[str, list[float]] = {v: [] for v in variants}
    for i, (v, rps) in enumerate(timeline):
        if v == "off":
            continue
        before = max(j for j in offs if j < i)
        after = min(j for j in offs if j > i)
        ref = (timeline[before][1] + timeline[after][1]) / 2
        ratios[v].append(1 - rps / ref)
    return {v: round(100 * statistics.median(r), 1) for v, r in ratios.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--model", default="breast-cancer")
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--postgres-url", default=os.environ.get("MCSERVE_TEST_POSTGRES_URL"))
    ap.add_argument("--baseline", type=Path, default=None, help="another checkout (A/B)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    variants = ["off", "sqlite"] + (["postgres"] if args.postgres_url else [])
    audited = variants[1:]
    variants += [f"{v}-baseline" for v in audited] if args.baseline else []
    tmp = Path(tempfile.mkdtemp(prefix="mcserve-bench-audit-"))
    base = {"MCSERVE_DRAIN_GRACE_S": "0"}
    envs: dict[str, dict[str, str]] = {
        "off": {**base, "MCSERVE_AUDIT": "false"},
        "sqlite": {**base, "MCSERVE_AUDIT": "true", "MCSERVE_AUDIT_PATH": str(tmp / "audit.db")},
    }
    schemas = [f"bench_{uuid.uuid4().hex[:10]}" for _ in range(2)]
    if args.postgres_url:
        import psycopg

        urls = []
        for schema in schemas:
            with psycopg.connect(args.postgres_url, autocommit=True) as conn:
                conn.execute(f"CREATE SCHEMA {schema}")
            sep = "&" if "?" in args.postgres_url else "?"
            urls.append(f"{args.postgres_url}{sep}options=-csearch_path%3D{schema}")
        envs["postgres"] = {**base, "MCSERVE_AUDIT": "true", "MCSERVE_AUDIT_URL": urls[0]}
        envs["postgres-baseline"] = {**envs["postgres"], "MCSERVE_AUDIT_URL": urls[1]}
    cmds: dict[str, list[str] | None] = {v: None for v in variants}
    if args.baseline:
        envs["sqlite-baseline"] = {**envs["sqlite"], "MCSERVE_AUDIT_PATH": str(tmp / "base.db")}
        serve = (
            f"cd {shlex.quote(str(args.baseline.resolve()))} && exec {shlex.quote(sys.executable)}"
            f" -m service serve --log-level warning --model-dir {shlex.quote(str(ROOT / 'models'))}"
            ' "$@"'
        )
        for v in audited:  # start() appends --port N
            cmds[f"{v}-baseline"] = ["bash", "-c", serve, "serve"]
    servers = {v: start("mcserve", envs[v], cmds[v]) for v in variants}
    audited_all = variants[1:]
    runs: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        body = {"instances": [instance(args.model)], "parameters": {"samples": args.samples}}
        json.dump(body, f)
    try:
        timeline: list[tuple[str, float]] = []  # (variant, rps) in the order run
        shuffle = random.Random(20261127)
        for rep in range(args.repeats):
            # `off` first, the audited variants in a fresh random order every repeat (fixed
            # seed), so that none always runs right after the same one. (Until 2026-11-27 the
            # order rotated, which alternates with two audited variants but keeps neighbours
            # with three or more, as with --baseline.)
            for v in ["off", *shuffle.sample(audited_all, len(audited_all))]:
                r = wrk(servers[v][1], args.model, f.name, args.concurrency, args.duration)
                runs[v].append(r)
                timeline.append((v, r["rps"]))
                print(rep, v, r, flush=True)
        timeline.append(("off", wrk(servers["off"][1], args.model, f.name, args.concurrency,
                                    args.duration)["rps"]))  # fmt: skip
        counts: dict[str, dict[str, int]] = {}
        for v in variants:
            proc, port = servers[v]
            served = answered(port)
            code = stop_cleanly(proc)
            rows = count_rows(v, envs[v]) if v != "off" else 0  # before the tmp dir goes
            counts[v] = {"answered_200": served, "rows": rows, "exit_code": code}
    finally:
        for proc, _ in servers.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        os.unlink(f.name)
        shutil.rmtree(tmp, ignore_errors=True)
        if args.postgres_url:
            import psycopg

            for schema in schemas:
                with psycopg.connect(args.postgres_url, autocommit=True) as conn:
                    conn.execute(f"DROP SCHEMA {schema} CASCADE")
    median = {
        v: {m: round(statistics.median(r[m] for r in rs), 2) for m in rs[0]}
        for v, rs in runs.items()
    }
    off = median["off"]["rps"]
    report: dict[str, Any] = {
        "machine": machine(),
        "date": now(),
        "model": args.model,
        "samples": args.samples,
        "concurrency": args.concurrency,
        "repeats": args.repeats,
        "duration_s": args.duration,
        "median": median,
        "slowdown_pct": {v: round(100 * (1 - median[v]["rps"] / off), 1) for v in variants},
        # The same, repeat by repeat (each variant against the off run next to it): less
        # sensitive to load that drifts over the run on a shared machine.
        "slowdown_pct_paired_median": {
            v: round(
                100
                * statistics.median(
                    1 - a["rps"] / b["rps"] for a, b in zip(runs[v], runs["off"], strict=True)
                ),
                1,
            )
            for v in variants
        },
        # Each audited run against the mean of the `off` runs just before and just after it
        # (an `off` run opens every repeat, and one closes the run): on this VM the host's speed
        # swings by up to 2x within a minute, and this pairing follows it most closely.
        "slowdown_pct_bracketed_median": bracketed(timeline, audited_all),
        "rps_runs": {v: [r["rps"] for r in rs] for v, rs in runs.items()},
        "timeline": timeline,
        "counts": counts,
        "rows_equal_answers": all(
            c["rows"] == c["answered_200"] for v, c in counts.items() if v != "off"
        ),
    }
    print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
