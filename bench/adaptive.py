"""Adaptive passes against fixed T = 100 and T = 1,000 on the bundled models' test rows.

Mean passes used, requests/s (median of interleaved rounds, a fresh order each) and how often
the label, the conformal prediction set and the referral agree with T = 1,000 (same seed per
row). Engine level by default: one request per test row, one after the other on one thread.
With --http: a real server process (`python -m service serve`, compute process on, as
deployed) on 127.0.0.1, one /v1 request per test row, `--concurrency` (16) in flight from an
httpx client in this process (on the same cores as the server).

    python -m bench.adaptive [--models breast-cancer,diabetes,digits] [--tolerance 0.01]
        [--rounds 5] [--http] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import machine, now
from service.bundle import load_bundle
from service.calibration.data import read
from service.engine import adaptive
from service.engine.model import ServedModel
from service.engine.params import PredictParams
from service.engine.prediction import Prediction
from service.engine.summaries import ClassificationSummary

ROOT = Path(__file__).resolve().parents[1]


def _decisions(pred: Prediction) -> tuple[object, ...]:
    s = pred.summary
    refer = bool(pred.referral.refer[0]) if pred.referral is not None else None
    if isinstance(s, ClassificationSummary):
        members = tuple(s.prediction_sets[0].members[0].tolist()) if s.prediction_sets else ()
        return int(s.label[0]), members, refer
    return (refer,)


def bench(name: str, tolerance: float, max_samples: int, rounds: int) -> dict[str, object]:
    model = ServedModel(load_bundle(ROOT / "models" / name / "2"), device="cpu")
    data = read(ROOT / "models" / "data" / f"{name}-test.csv", model.manifest)
    level = model.calibrator.policy.level
    auto = adaptive.Adaptive(max_samples=max_samples, tolerance=tolerance)
    out: dict[str, object] = {"model": name, "rows": data.n}
    answers: dict[str, list[Prediction]] = {}

    def one(label: str, i: int) -> Prediction:
        x = data.x[i : i + 1]
        if label == "auto":
            return adaptive.run(model, [x], [PredictParams(0, (level,), seed=i)], auto)[0]
        return model.predict(x, PredictParams(int(label[2:]), (level,), seed=i))

    for label in ("T=100", "T=1000", "auto"):  # warm-up: caches, the mask kernel's compilation
        for i in range(3):
            one(label, i)
    labels = ["T=100", "T=1000", "auto"]
    walls: dict[str, list[float]] = {k: [] for k in labels}
    order = np.random.default_rng(0)
    for _ in range(rounds):  # interleaved rounds, a fresh order each: the host is shared
        for label in order.permutation(labels).tolist():
            t0 = time.perf_counter()
            preds = [one(label, i) for i in range(data.n)]
            walls[label].append(time.perf_counter() - t0)
            answers[label] = preds  # the same every round: fixed seeds
    for label in labels:
        out[label] = {
            "requests_per_s": round(data.n / float(np.median(walls[label])), 1),
            "mean_passes": round(float(np.mean([p.samples or 0 for p in answers[label]])), 1),
        }
    ref = [_decisions(p) for p in answers["T=1000"]]
    for label in ("T=100", "auto"):
        got = [_decisions(p) for p in answers[label]]
        agree = np.mean([a == b for a, b in zip(got, ref, strict=True)])
        out[label]["agree_with_T1000"] = round(float(agree), 4)  # type: ignore[index]
    return out


def _http_decisions(p: dict[str, Any]) -> tuple[object, ...]:
    refer = p["referral"]["refer"] if "referral" in p else None
    if "label" in p:
        return p["label"], tuple(p.get("prediction_set", {}).get("labels", ())), refer
    return (refer,)


async def _round(
    url: str, rows: list[Any], params: dict[str, Any], concurrency: int
) -> tuple[float, list[dict[str, Any]]]:
    """One pass over the rows, `concurrency` requests in flight: (seconds, predictions)."""
    import httpx

    out: list[dict[str, Any]] = [{} for _ in rows]
    todo = iter(range(len(rows)))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:

        async def worker() -> None:
            for i in todo:  # one shared iterator: each row is sent once
                body = {"instances": [rows[i]], "parameters": {**params, "seed": i}}
                r = await client.post(url, json=body)
                r.raise_for_status()
                out[i] = r.json()["predictions"][0]

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - t0, out


def bench_http(
    name: str, tolerance: float, max_samples: int, rounds: int, concurrency: int
) -> dict[str, Any]:
    from bench.load import start, stop

    model = ServedModel(load_bundle(ROOT / "models" / name / "2"), device="cpu")
    data = read(ROOT / "models" / "data" / f"{name}-test.csv", model.manifest)
    rows = data.x.tolist()
    auto = {"samples": "auto", "max_samples": max_samples, "tolerance": tolerance}
    configs: dict[str, dict[str, Any]] = {"T=100": {"samples": 100}, "T=1000": {"samples": 1000}}
    configs["auto"] = auto
    proc, port = start("mcserve", {"MCSERVE_COMPUTE_PROCESS": "true"})
    url = f"http://127.0.0.1:{port}/v1/models/{name}/versions/2:predict"
    walls: dict[str, list[float]] = {k: [] for k in configs}
    answers: dict[str, list[dict[str, Any]]] = {}
    try:
        for params in configs.values():  # warm-up: the first chunks, the connections
            asyncio.run(_round(url, rows[:32], params, concurrency))
        order = np.random.default_rng(0)
        for _ in range(rounds):  # interleaved rounds, a fresh order each: the host is shared
            for label in order.permutation(list(configs)).tolist():
                wall, preds = asyncio.run(_round(url, rows, configs[label], concurrency))
                walls[label].append(wall)
                answers[label] = preds  # the same every round: fixed seeds
    finally:
        stop(proc)
    out: dict[str, Any] = {"model": name, "rows": data.n, "concurrency": concurrency}
    ref = [_http_decisions(p) for p in answers["T=1000"]]
    for label, params in configs.items():
        used = [p.get("passes_used", params["samples"]) for p in answers[label]]
        got = [_http_decisions(p) for p in answers[label]]
        out[label] = {
            "requests_per_s": round(data.n / float(np.median(walls[label])), 1),
            "mean_passes": round(float(np.mean(used)), 1),
            "agree_with_T1000": round(
                float(np.mean([a == b for a, b in zip(got, ref, strict=True)])), 4
            ),
            "walls_s": [round(w, 2) for w in walls[label]],
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", default="breast-cancer,diabetes,digits")
    ap.add_argument("--tolerance", type=float, default=0.01)
    ap.add_argument("--max-samples", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds; medians")
    ap.add_argument("--http", action="store_true", help="through a real server, /v1")
    ap.add_argument("--concurrency", type=int, default=16, help="--http: requests in flight")
    args = ap.parse_args()
    print(f"# {machine()}, {now()}")
    for name in args.models.split(","):
        if args.http:
            r = bench_http(name, args.tolerance, args.max_samples, args.rounds, args.concurrency)
        else:
            r = bench(name, args.tolerance, args.max_samples, args.rounds)
        print(r, flush=True)


if __name__ == "__main__":
    main()
