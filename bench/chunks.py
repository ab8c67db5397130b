"""Forward chunks of a text model sized in tokens against the row budget alone.

    python -m bench.chunks [--model DIR ...] [--texts 1 16 64] [--samples 20] [--repeats 5]

For each bundle (default: the served `medical-abstracts` and, if bench.text_archs has cached it,
its transformer) two samplers over the same weights run the same requests, interleaved: one
with forwards of at most `budgets.TOKEN_BUDGET` tokens (the engine's default on the CPU) and
one with the row budget alone (16,384 rows per forward, the engine before). Both must answer the
same bits (asserted). Prints documents/s (medians) and the ratio; `--out` writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import machine, median, now
from models import medical_abstracts
from service.bundle.load import load_bundle
from service.calibration.data import read
from service.engine.budgets import TOKEN_BUDGET
from service.engine.sampler import MCRequest, MCSampler

ROOT = Path(__file__).resolve().parent.parent
MODELS = [
    ROOT / "models" / medical_abstracts.NAME / medical_abstracts.SERVED,
    Path("/tmp/mcserve-text-archs/medical-abstracts-transformer/1"),
]
ROW_BUDGET = 16384  # settings.forward_rows' default


DATA = ROOT / "models" / "data" / "medical-abstracts-test.csv"  # the test abstracts, in order


def measure(path: Path, texts: list[int], samples: int, repeats: int) -> dict[str, Any]:
    bundle = load_bundle(path)
    ids = read(DATA, bundle.manifest, tokenizer=bundle.tokenizer).x[: max(texts)]
    example = torch.as_tensor(ids[:2])
    samplers = {
        "tokens": MCSampler(load_bundle(path).module, example, row_budget=ROW_BUDGET),
        "rows": MCSampler(
            load_bundle(path).module,
            example,
            row_budget=ROW_BUDGET,
            token_budget=None,
            activation_budget=False,  # the engine before either budget
        ),
    }
    out: dict[str, Any] = {
        "model": str(path),
        "tokens_per_text": int(ids.shape[1]),
        "rows_per_forward": {k: s.row_budget for k, s in samplers.items()},
        "cells": [],
    }
    for n in texts:
        req = [MCRequest(ids[:n], samples, 0)]
        times: dict[str, list[float]] = {k: [] for k in samplers}
        answers = {k: s.run(req)[0] for k, s in samplers.items()}  # warm-up
        assert np.array_equal(answers["tokens"], answers["rows"]), "chunking changed the bits"
        for _ in range(repeats):
            for k, s in samplers.items():
                t0 = time.perf_counter()
                s.run(req)
                times[k].append(time.perf_counter() - t0)
        docs = {k: n / median(v) for k, v in times.items()}
        out["cells"].append(
            {"texts": n, "documents_per_s": docs, "ratio": docs["tokens"] / docs["rows"]}
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", type=Path, nargs="*", default=[m for m in MODELS if m.is_dir()])
    ap.add_argument("--texts", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(2)
    res = {
        "machine": machine(),
        "date": now(),
        "token_budget": TOKEN_BUDGET,
        "samples": args.samples,
        "models": [measure(p, args.texts, args.samples, args.repeats) for p in args.model],
    }
    print(
        "| model (tokens per text) | texts | token-sized forwards | 16,384-row forwards | ratio |"
    )
    print("|---|---|---|---|---|")
    for m in res["models"]:
        for c in m["cells"]:
            d = c["documents_per_s"]
            print(
                f"| {Path(m['model']).parent.name} ({m['tokens_per_text']}) | {c['texts']} | "
                f"{d['tokens']:.1f} /s | {d['rows']:.1f} /s | {c['ratio']:.2f}x |"
            )
    if args.out:
        args.out.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
