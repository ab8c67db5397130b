"""What the body-cost check costs the event loop: the plain separator count every large body
pays, and the recount outside strings a body over the bound pays (service/engine/inputs.py).

    python -m bench.separators [--repeats 7]

Bodies of 7-8 MB (the default MCSERVE_MAX_BODY_BYTES is 8 MiB): texts full of commas (lab
values: the recount's reason to exist), texts with escaped quotes, a body made of escaped quotes
and commas (the worst case for the recount), many empty strings, and bare numbers. For each:
the median seconds of the plain count (the baseline every body over the bound pays) and of the
recount, their ratio, and the recount's peak traced memory (tracemalloc: numpy's arrays).
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

from bench.common import machine, median, now
from service.engine.inputs import separators_outside_strings

BODIES = {
    "texts with commas (90 x 90 kB)": b'{"instances": ['
    + b",".join([b'"' + b"1," * 45_000 + b'"'] * 90)
    + b"]}",
    "texts with escaped quotes (90 x 77 kB)": b'{"instances": ['
    + b",".join([b'"' + b'say \\"1,\\" ' * 7_000 + b'"'] * 90)
    + b"]}",
    'escaped quotes and commas (one string of 2.7 M `\\",`)': b'["' + b'\\",' * 2_700_000 + b'"]',
    "many empty strings (2.7 M)": b"[" + b'"",' * 2_700_000 + b'""]',
    "numbers (4 M)": b"[" + b"0," * 4_000_000 + b"0]",
}


def _plain(raw: bytes) -> int:
    return raw.count(b",") + raw.count(b"[") + raw.count(b"{")


def _median_s(fn: object, raw: bytes, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(raw)  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    print(f"Command: `python -m bench.separators --repeats {args.repeats}`; {machine()}, {now()}\n")
    print("| body | MB | plain count ms | recount ms | ratio | recount peak MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, raw in BODIES.items():
        separators_outside_strings(raw)  # warm: numpy's first call of each kernel
        plain = _median_s(_plain, raw, args.repeats)
        recount = _median_s(separators_outside_strings, raw, args.repeats)
        tracemalloc.start()
        separators_outside_strings(raw)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        print(
            f"| {name} | {len(raw) / 1e6:.1f} | {plain * 1e3:.1f} | {recount * 1e3:.1f} | "
            f"{recount / plain:.1f} | {peak / 2**20:.0f} |"
        )


if __name__ == "__main__":
    main()
