"""Turns (service/engine/turns.py): how long a short request waits behind one long request, and
what the turns cost the long one.

For each `MCSERVE_TURN_MS` (0: a request goes to the compute whole, the behaviour before turns),
a real server: one long request (medical-abstracts: 64 test abstracts x 1,000 passes; the
breast-cancer tabular model: 1,024 rows x 1,000 passes), then 0.5 s later one short request (one
instance, 20 passes); and for medical-abstracts three long requests at once (32 abstracts x
1,000 passes each), then the short one. Medians of `--repeats` of each, the settings
interleaved; ratios to MCSERVE_TURN_MS=0 in the same run.

    python -m bench.turns [--repeats 3]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import threading
import time

import httpx

from bench.common import machine, now
from bench.load import ROOT, instance, start, stop

SETTINGS = ("0", "1000", "250")
SHORT_AFTER_S = 0.5


def long_body(model: str, texts: int = 64) -> dict[str, object]:
    with (ROOT / "models" / "data" / f"{model}-test.csv").open() as f:
        rows = list(csv.DictReader(f))
    if model == "medical-abstracts":
        instances: list[object] = [r["text"] for r in rows[:texts]]
    else:
        feats = [[float(v) for k, v in r.items() if k != "target"] for r in rows]
        instances = [feats[i % len(feats)] for i in range(1024)]
    return {"instances": instances, "parameters": {"samples": 1000, "seed": 3}}


def once(
    port: int, model: str, body: dict[str, object], longs: int = 1
) -> tuple[float, float, float]:
    """(seconds of the slowest long request, of the short one sent 0.5 s after them, of the
    fastest long request)."""
    url = f"http://127.0.0.1:{port}/v1/models/{model}:predict"
    short = {"instances": [instance(model)], "parameters": {"samples": 20, "seed": 1}}
    took: list[float] = []

    def run_long() -> None:
        t = time.perf_counter()
        r = httpx.post(url, json=body, timeout=600)
        r.raise_for_status()
        took.append(time.perf_counter() - t)

    threads = [threading.Thread(target=run_long) for _ in range(longs)]
    for thread in threads:
        thread.start()
    time.sleep(SHORT_AFTER_S)
    t = time.perf_counter()
    httpx.post(url, json=short, timeout=600).raise_for_status()
    short_s = time.perf_counter() - t
    for thread in threads:
        thread.join()
    return max(took), short_s, min(took)


def table(name: str, seen: dict[str, list[tuple[float, float, float]]]) -> None:
    base_long = statistics.median(t for t, _, _ in seen["0"])
    print(f"\n{name}")
    print(
        "| MCSERVE_TURN_MS | slowest long request (s) | vs whole | fastest long request (s) "
        "| short request behind it (s) |"
    )
    print("|---|---|---|---|---|")
    for setting, runs in seen.items():
        long_s = statistics.median(t for t, _, _ in runs)
        first_s = statistics.median(f for _, _, f in runs)
        short_s = statistics.median(s for _, s, _ in runs)
        print(
            f"| {setting} | {long_s:.2f} | {long_s / base_long:.2f}x | {first_s:.2f} "
            f"| {short_s:.2f} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", default="medical-abstracts,breast-cancer")
    ap.add_argument("--only-several", action="store_true", help="only the three long requests")
    args = ap.parse_args()
    flags = " --only-several" if args.only_several else ""
    print(f"{now()} | {machine()} | python -m bench.turns --repeats {args.repeats}{flags}")
    cases: list[tuple[str, str, dict[str, object], int, tuple[str, ...]]] = []
    for model in args.models.split(","):
        if not args.only_several:
            cases.append((f"{model}: one long request", model, long_body(model), 1, SETTINGS))
        if model == "medical-abstracts":
            three = long_body(model, texts=32)
            cases.append((f"{model}: three long requests", model, three, 3, ("0", "1000")))
    for name, model, body, longs, settings in cases:
        seen: dict[str, list[tuple[float, float, float]]] = {s: [] for s in settings}
        for _ in range(args.repeats):
            for setting in settings:  # interleaved: drift on a shared machine hits each alike
                proc, port = start("mcserve", {"MCSERVE_TURN_MS": setting})
                try:
                    once(port, model, body)  # warm: the first long request measures the rate
                    seen[setting].append(once(port, model, body, longs))
                finally:
                    stop(proc)
        table(name, seen)


if __name__ == "__main__":
    main()
