"""What tokenizing one large text request holds in memory (service/engine/text.py).

    python -m bench.tokenize_memory [--texts 80] [--repeats 3]

One request body's worth of texts (80 texts of 100 kB, `max_text_bytes`, about 8 MB: under the
default `max_body_bytes`) through `encode_texts` with the served `medical-abstracts` tokenizer,
in groups of at most `TOKENIZE_BYTES` (1 MiB, the default) against all texts at once (the
earlier behaviour, the limit set past the whole body). Each arm runs in a fresh process and
reports its peak RSS growth over the loaded tokenizer (ru_maxrss) and its wall time; medians
over repeats. The ids are asserted equal between the arms.
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


def _served() -> Path:
    return max((p for p in BUNDLE.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


def one(texts: int, group_bytes: int) -> dict[str, float | str]:
    """In this process: load, then tokenize `texts` texts once with the given group size."""
    from service.bundle.load import load_bundle
    from service.engine import text

    bundle = load_bundle(_served())
    spec = bundle.manifest.inputs.text
    assert spec is not None
    body = [("word " * (spec.max_text_bytes // 5))[: spec.max_text_bytes]] * texts
    text.TOKENIZE_BYTES = group_bytes
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    batch = text.encode_texts(body, bundle.tokenizer, spec, 1024)
    seconds = time.perf_counter() - start
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    digest = hashlib.sha256(batch.ids.tobytes() + str(batch.tokens).encode()).hexdigest()
    return {"seconds": seconds, "peak_mib": grown / 1024, "digest": digest}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--texts", type=int, default=80)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(one(*a.child)))
        return
    from service.engine.text import TOKENIZE_BYTES

    groups = {"groups of 1 MiB (served)": TOKENIZE_BYTES, "all at once (before)": 1 << 40}
    arms = {k: [str(a.texts), str(g)] for k, g in groups.items()}
    runs = fresh_process_arms("bench.tokenize_memory", arms, a.repeats)
    digests = {r["digest"] for rs in runs.values() for r in rs}
    assert len(digests) == 1, "the arms tokenized differently"
    print(f"{machine()}, {now()}; {a.texts} texts of 100 kB, {_served().name}, {a.repeats} runs")
    base = median([float(r["peak_mib"]) for r in runs["all at once (before)"]])
    for name, rs in runs.items():
        peak = median([float(r["peak_mib"]) for r in rs])
        secs = median([float(r["seconds"]) for r in rs])
        print(f"{name}: peak RSS growth {peak:.0f} MiB ({peak / base:.2f}x), {secs:.2f} s")


if __name__ == "__main__":
    main()
