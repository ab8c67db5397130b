"""Server start-up to ready, with numba's mask kernels compiled (empty cache) or loaded from disk.

    python -m bench.start [--repeats 5] [--compute-process true|false]

Each start runs `python -m service serve` on the bundled models and is timed from launch to the
first 200 from /readyz (every model loaded and warmed; with the compute process, in that
process, which is where the kernels are compiled), then stopped. "compiled": NUMBA_CACHE_DIR is
a new empty directory; "cached": the directory the start before filled. The two alternate;
medians and ranges are printed as a table for docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench.common import machine, median, now
from bench.load import start, stop


def one(cache: Path, compute_process: str) -> float:
    began = time.monotonic()
    env = {"NUMBA_CACHE_DIR": str(cache), "MCSERVE_COMPUTE_PROCESS": compute_process}
    proc, _ = start("mcserve", env)
    took = time.monotonic() - began
    stop(proc)
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--compute-process", choices=("true", "false"), default="true")
    args = ap.parse_args()
    times: dict[str, list[float]] = {"compiled": [], "cached": []}
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.repeats):
            cache = Path(tmp) / str(k)
            times["compiled"].append(one(cache, args.compute_process))  # fills `cache`
            times["cached"].append(one(cache, args.compute_process))
    base = median(times["compiled"])
    print(f"`python -m bench.start --repeats {args.repeats} --compute-process "
          f"{args.compute_process}`; {machine()}, {now()}\n")  # fmt: skip
    print("| mask kernels | start to ready, median | range | vs compiled |")
    print("|---|---|---|---|")
    for name, xs in times.items():
        print(
            f"| {name} | {median(xs):.2f} s | {min(xs):.2f}-{max(xs):.2f} s | "
            f"{median(xs) / base:.2f}x |"
        )


if __name__ == "__main__":
    main()
