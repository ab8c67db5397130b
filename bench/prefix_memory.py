"""What one large MC request to a text model holds in memory (service/engine/sampler.py).

    python -m bench.prefix_memory [--texts 1024] [--samples 20] [--repeats 3]

One request of `--texts` medical abstracts (the default `max_instances`, 1,024; each about 2.3 kB,
padded to 900 tokens) at `--samples` passes through the served `medical-abstracts` bundle's
sampler: the deterministic prefix run `PREFIX_BUDGET` values at a time (served), against one
prefix forward over every input (the earlier behaviour, the budget set past the batch). Each arm
runs in a fresh process and reports its peak RSS growth over the loaded model (ru_maxrss) and its
wall time; medians over repeats. The samples are asserted bit-identical between the arms.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import time
from pathlib import Path

from bench.common import fresh_process_arms, machine, median, now

ROOT = Path(__file__).resolve().parent.parent
BUNDLE = ROOT / "models" / "medical-abstracts"
ABSTRACT = (
    "Patients with type 2 diabetes mellitus were randomised to metformin or placebo and "
    "followed for cardiovascular outcomes. "
) * 20


def _served() -> Path:
    return max((p for p in BUNDLE.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


def one(texts: int, samples: int, budget: int) -> dict[str, float | str]:
    """In this process: load, then sample one request of `texts` abstracts once."""
    from service.bundle.load import load_bundle
    from service.engine import budgets
    from service.engine.model import ServedModel
    from service.engine.params import PredictParams
    from service.engine.text import encode_texts

    budgets.PREFIX_BUDGET = budget  # read when the model's sampler is built
    bundle = load_bundle(_served())
    model = ServedModel(bundle)
    spec = bundle.manifest.inputs.text
    assert spec is not None
    ids = encode_texts([ABSTRACT] * texts, bundle.tokenizer, spec, texts).ids
    req = model.mc_request(ids, PredictParams(samples=samples, confidence=(0.95,), seed=42))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    (out,) = model.sample([req])
    seconds = time.perf_counter() - start
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    return {
        "seconds": seconds,
        "peak_mib": grown / 1024,
        "chunk": model.sampler.prefix_chunk,
        "digest": hashlib.sha256(out.tobytes()).hexdigest(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--texts", type=int, default=1024)
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", nargs=3, type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(one(*a.child)))
        return
    from service.engine.budgets import PREFIX_BUDGET

    budgets = {"prefix in chunks (served)": PREFIX_BUDGET, "one prefix forward (before)": 1 << 60}
    arms = {k: [str(a.texts), str(a.samples), str(b)] for k, b in budgets.items()}
    runs = fresh_process_arms("bench.prefix_memory", arms, a.repeats)
    digests = {r["digest"] for rs in runs.values() for r in rs}
    assert len(digests) == 1, "the arms sampled different bits"
    print(
        f"{machine()}, {now()}; {a.texts} abstracts x {a.samples} passes, version "
        f"{_served().name}, {a.repeats} runs"
    )
    base = median([float(r["peak_mib"]) for r in runs["one prefix forward (before)"]])
    for name, rs in runs.items():
        peak = median([float(r["peak_mib"]) for r in rs])
        secs = median([float(r["seconds"]) for r in rs])
        chunk = rs[0]["chunk"] if "served" in name else "every"
        print(
            f"{name}: {chunk} inputs a prefix forward, peak RSS growth {peak:.0f} MiB "
            f"({peak / base:.2f}x), {secs:.2f} s"
        )


if __name__ == "__main__":
    main()
