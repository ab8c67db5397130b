"""What the unfamiliar-text check costs per served text (service/engine/familiar.py).

    python -m bench.familiar [--repeats 5] [--out FILE]

On the 575 test abstracts, tokenized as a request is (padded to 900 tokens), in batches of 1 and
64 texts: the referral of the served `medical-abstracts` bundle (with its word list) against the
same bundle's policy without it (version 7: the same network and calibration), and the two ways
to read words from ids: the WordPiece table the engine uses and the tokenizer's decoder (which
the table must equal: asserted). Prints microseconds per text (medians over repeats); the
forward passes are not run (one summary is reused), so this is the check alone.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import machine, median, now
from models import medical_abstracts as recipe
from service.bundle.load import load_bundle
from service.calibration.data import read
from service.engine import slicing
from service.engine.familiar import WordReader
from service.engine.model import ServedModel
from service.engine.params import PredictParams

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models" / recipe.NAME
DATA = ROOT / "models" / "data" / f"{recipe.NAME}-test.csv"
OLD = "7"  # the same network and calibration without a word list


def per_text_us(fn: Callable[[int, int], Any], n: int, batch: int, repeats: int) -> float:
    """Median microseconds per text of fn(lo, hi) over the batches lo:hi of n texts."""
    bounds = [(i, min(i + batch, n)) for i in range(0, n, batch)]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for lo, hi in bounds:
            fn(lo, hi)
        times.append((time.perf_counter() - t0) / n * 1e6)
    return median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    served = {v: ServedModel(load_bundle(MODELS / v), device="cpu") for v in (recipe.SERVED, OLD)}
    new = served[recipe.SERVED]
    assert new.calibrator.familiarity is not None, "the served bundle has no word list"
    ids = read(DATA, new.manifest, tokenizer=new.bundle.tokenizer).x
    table, decoder = WordReader(new.bundle.tokenizer), WordReader.by_decoder(new.bundle.tokenizer)
    rows = [r[r != 0] for r in ids]
    assert table(rows) == decoder(rows), "the table reads other words than decoding"
    res: dict[str, Any] = {"machine": machine(), "date": now(), "texts": len(ids), "cells": []}
    whole = new.predict(ids, PredictParams(20, (0.95,), 0))
    parts = {
        batch: {
            lo: slicing.cut(whole, lo, min(lo + batch, len(ids)))[0]
            for lo in range(0, len(ids), batch)
        }
        for batch in (1, 64)
    }
    for batch in (1, 64):
        cell: dict[str, Any] = {"batch": batch}
        for v, m in served.items():
            cell[f"referral v{v}"] = per_text_us(
                lambda lo, hi, m=m, b=batch: m.calibrator.referral(parts[b][lo], ids[lo:hi]),
                len(ids), batch, args.repeats,
            )  # fmt: skip
        for name, reader in (("words by table", table), ("words by decoder", decoder)):
            cell[name] = per_text_us(
                lambda lo, hi, r=reader: r([x[x != 0] for x in ids[lo:hi]]),
                len(ids), batch, args.repeats,
            )  # fmt: skip
        res["cells"].append(cell)
        print(json.dumps(cell))
    if args.out:
        args.out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
