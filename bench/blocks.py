"""Cost of fixed row blocks (service/engine/blocks.py): one `linear` against the same product as a
batch of identical blocks, for the layer shapes of the benchmarks and the bundled models.

    python -m bench.blocks [--rounds 15] [--threads 1] [--json FILE]

Interleaved round by round (a fresh random order per round, fixed seed), 5 calls per timing,
medians in microseconds. Rows per block: 8 to 128 for the suffix (candidates for BLOCK_ROWS) and
1 for the prefix.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bench.common import machine, median, now, timed
from service.engine.blocks import blocked_linear

# (in, out, rows): the engine benchmark's MLP at T=100, B=64 (suffix and prefix), the digits
# head, a 1-input request at T=100 (128 rows once padded), and prefixes at 64 and 1,024 inputs.
SUFFIX = [(256, 256, 6400), (256, 2, 6400), (128, 10, 6400), (64, 64, 128)]
PREFIX = [(30, 64, 64), (512, 128, 64), (512, 128, 1024)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    variants: dict[str, Callable[[], object]] = {}
    for shapes, block_rows in ((SUFFIX, (8, 16, 32, 64, 128)), (PREFIX, (1,))):
        for i, o, n in shapes:
            w, b = torch.randn(o, i, generator=g), torch.randn(o, generator=g)
            x = torch.randn(n, i, generator=g)
            key = f"{i}->{o} x {n}"
            variants[f"{key} | linear"] = lambda x=x, w=w, b=b: F.linear(x, w, b)
            for rows in block_rows:
                if n % rows == 0:
                    variants[f"{key} | blocks of {rows}"] = lambda x=x, w=w, b=b, r=rows: (
                        blocked_linear(x, w, b, r)
                    )
    for fn in variants.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    order = random.Random(20261206)
    names = list(variants)
    with torch.inference_mode():
        for _ in range(args.rounds):
            for k in order.sample(names, len(names)):
                times[k].append(timed(variants[k], repeat=5))
    result = {
        "machine": machine(),
        "date": now(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "median_us": {k: round(median(v) * 1e6, 1) for k, v in times.items()},
    }
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
