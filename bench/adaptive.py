"""Adaptive passes against fixed T = 100 and T = 1,000 on the bundled models' test rows.

Engine level, one request per test row, one after the other on one thread (the HTTP parameter
is not wired yet, so no concurrency figure): mean passes used, requests/s (median of
interleaved rounds), and how often the label, the conformal prediction set and the referral
agree with T = 1,000 (same seed per row).

    python -m bench.adaptive [--models breast-cancer,diabetes,digits] [--tolerance 0.01]
        [--rounds 5]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from bench.common import machine, now
from service.bundle import load_bundle
from service.calibration.data import read
from service.engine import adaptive
from service.engine.model import PredictParams, ServedModel
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", default="breast-cancer,diabetes,digits")
    ap.add_argument("--tolerance", type=float, default=0.01)
    ap.add_argument("--max-samples", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds; medians")
    args = ap.parse_args()
    print(f"# {machine()}, {now()}")
    for name in args.models.split(","):
        print(bench(name, args.tolerance, args.max_samples, args.rounds))


if __name__ == "__main__":
    main()
