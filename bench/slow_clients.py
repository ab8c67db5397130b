"""Hostile clients against a real server on 127.0.0.1, and an honest client's latency meanwhile.

    python -m bench.slow_clients [--baseline-tree DIR] [--rounds 3] [--duration 6]
                                 [--held 700] [--nofile 512] [--hostile 3]
                                 [--phases quiet ... half_open] [--out FILE.json]

Issue 27, findings 4 and 5. This tree, and with --baseline-tree the same command from another
checkout (e.g. `git archive 0445643 | tar -x -C /tmp/base`), go through phases of `--duration`
seconds; in each, one honest client sends one-instance predictions to `diabetes` (its default
samples) one after another, 10 ms apart, and its latencies are recorded:

- `quiet`: nobody else;
- `quiet_fresh` and `half_open`, on a second server of the same tree started with an open-file
  limit of `--nofile`: the honest client opens a new connection for each request (5 s timeout:
  a refused or timed-out request counts as failed); nobody else, or a separate process that
  keeps `--held` connections open, half sending nothing and half a request head cut short,
  opening a new one whenever the server closes one;
- `v1_json`, `v2_json`, `v2_binary`: `--hostile` processes each send, over and over, the
  finding's body: 1.3 M one-number instances in 5.2 MB of JSON (`/v1`), 1.3 M values in 5.2 MB
  of `/v2` JSON data, or 180,000 instances of 10 FP32 values (7.2 MB) as a `/v2` binary tensor; all
  under the 8 MB body limit, all over `max_instances`.

All servers are up at once; each round runs every phase on each tree in a random order (fixed
seed). Reported per tree and phase, medians over `--rounds`: honest requests answered and
failed, their latency median and p99 (ms), and the hostile requests' median answer time.
Every process is ended by its own PID (the servers by their process group, which is their
PID); every loop stops at its deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.common import machine, now
from bench.load import ROOT, start, stop

HONEST = {"instances": [[59.0, 2.0, 32.1, 101.0, 157.0, 93.2, 38.0, 4.0, 4.8598, 87.0]]}
HOSTILE_INSTANCES = 1_300_000
PHASES = ("quiet", "v1_json", "v2_json", "v2_binary", "quiet_fresh", "half_open")
PARTIAL_HEAD = b"POST /v1/models/diabetes:predict HTTP/1.1\r\nHost: x\r\nContent-Ty"


def hostile_request(kind: str) -> tuple[str, bytes, dict[str, str]]:
    """(path, body, headers) of the finding's body for `kind`."""
    if kind == "v1_json":
        body = b'{"instances":[' + b"[0]," * (HOSTILE_INSTANCES - 1) + b"[0]]}"
        return "/v1/models/diabetes:predict", body, {"content-type": "application/json"}
    if kind == "v2_json":
        tensor = b'{"name":"input","shape":[%d,10],"datatype":"FP32","data":[' % (
            HOSTILE_INSTANCES // 10
        )
        data = b"0.0," * (HOSTILE_INSTANCES - 1) + b"0.0"  # 5.2 MB, as the /v1 body
        body = b'{"inputs":[' + tensor + data + b"]}]}"
        return "/v2/models/diabetes/infer", body, {"content-type": "application/json"}
    raw = np.zeros((180_000, 10), dtype=np.float32).tobytes()
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [180_000, 10],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ]
        }
    ).encode()
    headers = {"inference-header-content-length": str(len(head))}
    return "/v2/models/diabetes/infer", head + raw, headers | {"content-type": "application/json"}


def _hostile(port: int, kind: str, until: float, out: Any) -> None:
    """One hostile process: the body again and again until `until` (time.monotonic)."""
    path, body, headers = hostile_request(kind)
    times, statuses = [], []
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
        while time.monotonic() < until:
            t = time.perf_counter()
            try:
                statuses.append(c.post(path, content=body, headers=headers).status_code)
            except httpx.TransportError:
                statuses.append(0)
            times.append(time.perf_counter() - t)
    out.put({"times": times, "statuses": statuses})


def _hold(port: int, held: int, until: float, out: Any) -> None:
    """Keep `held` half-open connections until `until`, reopening those the server closes."""

    async def one(i: int) -> int:
        opened = 0
        while time.monotonic() < until:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            opened += 1
            if i % 2:
                writer.write(PARTIAL_HEAD)
            with contextlib.suppress(TimeoutError, OSError):  # closed by the server, or time up
                await asyncio.wait_for(reader.read(), max(0.01, until - time.monotonic()))
            writer.close()
        return opened

    async def main() -> list[int]:
        return await asyncio.gather(*(one(i) for i in range(held)))

    out.put({"opened": sum(asyncio.run(main()))})


def honest(port: int, until: float, fresh: bool) -> dict[str, Any]:
    """Sequential predictions until `until`: latencies (ms) of those answered 200, failures."""
    url = f"http://127.0.0.1:{port}/v1/models/diabetes:predict"
    ok: list[float] = []
    failed = 0
    client = httpx.Client(timeout=5)
    try:
        while time.monotonic() < until:
            if fresh:  # a new connection for each request
                client.close()
                client = httpx.Client(timeout=5)
            t = time.perf_counter()
            try:
                r = client.post(url, json=HONEST)
                if r.status_code == 200:
                    ok.append((time.perf_counter() - t) * 1000)
                else:
                    failed += 1
            except httpx.HTTPError:
                failed += 1
            time.sleep(0.01)  # a modest honest rate: about 50 requests/s when quick
    finally:
        client.close()
    return summary(ok, failed)


def summary(ok: list[float], failed: int) -> dict[str, Any]:
    q = [float(v) for v in np.percentile(ok, [50, 99])] if ok else [float("nan")] * 2
    return {"answered": len(ok), "failed": failed, "p50_ms": q[0], "p99_ms": q[1]}


def phase(port: int, kind: str, args: argparse.Namespace) -> dict[str, Any]:
    until = time.monotonic() + args.duration
    results: Any = mp.get_context("fork").Queue()
    if kind in ("quiet", "quiet_fresh"):
        procs = []
    elif kind == "half_open":
        procs = [
            mp.get_context("fork").Process(target=_hold, args=(port, args.held, until, results))
        ]
    else:
        procs = [
            mp.get_context("fork").Process(target=_hostile, args=(port, kind, until, results))
            for _ in range(args.hostile)
        ]
    for p in procs:
        p.start()
    time.sleep(1.0 if procs else 0.0)  # let the attack build up first
    row = honest(port, until, fresh=kind in ("quiet_fresh", "half_open"))
    others = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
        if p.is_alive():
            p.kill()  # by its own PID (multiprocessing's handle)
    times = [t for o in others for t in o.get("times", [])]
    statuses = sorted({s for o in others for s in o.get("statuses", [])})
    if times:
        row |= {"hostile_sent": len(times), "hostile_p50_ms": statistics.median(times) * 1000}
        row["hostile_statuses"] = statuses
    if kind == "half_open":
        row["connections_opened"] = others[0]["opened"]
    return row


def server(tree: Path, nofile: int | None) -> tuple[Any, int]:
    cmd = [sys.executable, "-m", "service", "serve", "--log-level", "warning"]
    cmd += ["--model-dir", str(tree / "models")]
    if nofile is not None:  # the open-file limit of the server (and its compute process)
        cmd = ["sh", "-c", f'ulimit -n {nofile} && exec "$0" "$@"', *cmd]
    return start("mcserve", {}, cmd, cwd=tree)


def median_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in rows[0].items():
        if isinstance(value, int | float):
            out[key] = statistics.median(float(r[key]) for r in rows)
        else:
            out[key] = sorted({v for r in rows for v in r[key]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline-tree", type=Path, default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=6.0)
    ap.add_argument("--held", type=int, default=700)
    ap.add_argument("--nofile", type=int, default=512)
    ap.add_argument("--hostile", type=int, default=3)
    ap.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    trees = {"this": ROOT} | ({"baseline": args.baseline_tree} if args.baseline_tree else {})
    report: dict[str, Any] = {"machine": machine(), "date": now()}
    report["args"] = {k: str(v) for k, v in vars(args).items()}
    rows: dict[str, list[dict[str, Any]]] = {}
    rng = random.Random(7)
    # Two servers per tree, all up at once: default limits, and the low open-file limit.
    up = {}
    try:
        for name, tree in trees.items():
            up[name] = server(tree, None)
            if {"quiet_fresh", "half_open"} & set(args.phases):
                up[f"{name}|nofile"] = server(tree, args.nofile)
        for r in range(args.rounds):  # each phase on every tree in turn, a new order each round
            for kind in args.phases:
                order = list(trees)
                rng.shuffle(order)
                for name in order:
                    key = f"{name}|nofile" if kind in ("quiet_fresh", "half_open") else name
                    row = phase(up[key][1], kind, args)
                    rows.setdefault(f"{name}|{kind}", []).append(row)
                    print(r, name, kind, row, flush=True)
    finally:
        for proc, _ in up.values():
            stop(proc)
    report["median"] = {key: median_row(rs) for key, rs in rows.items()}
    report["rounds"] = rows
    text = json.dumps(report, indent=1)
    print(json.dumps(report["median"], indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
