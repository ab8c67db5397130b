"""Engine benchmark (issue: MC dropout engine): MC samples/s on the reference MLP and a CNN.

    python -m bench.engine [--rounds 9] [--json FILE]
    python -m bench.engine --baseline-tree DIR [--pairs 3] [--rounds 5] [--json FILE]

Variants, interleaved round by round so that machine noise hits all alike; medians reported:
(a) a Python loop of T passes; (b) naive vectorised torch (eval, dropout modules train,
x.repeat(T, 1), one forward); (c) the engine; (d) the same T*B rows with dropout off;
(e) a 2048x2048 float32 matmul, converted to rows/s with the MLP's FLOPs per row.
Also the engine with its masks made by torch ops instead of the fused CPU kernel (`fused=False`),
and for the CNN: one plain deterministic pass (`model.eval()(x)`, the issue's yardstick), the
engine, the engine with torch masks, and the engine's rewritten prefix alone (BatchNorm folded,
channels-last: the part of the pass that runs once per input).

With --baseline-tree (another checkout, e.g. a worktree of an earlier commit) the whole benchmark
runs in a fresh process per run, alternately from that checkout (its own code) and from this
one, `--pairs` times: the medians of each run and, per side, the median over its runs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from bench.common import machine, median, now, timed
from models.digits import model as digits_model
from service.engine import MCRequest, MCSampler

ROOT = Path(__file__).resolve().parents[1]
T, B = 100, 64
FLOPS_PER_ROW = 2 * (30 * 256 + 256 * 256 + 256 * 2)


def reference_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(30, 256),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Linear(256, 256),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Linear(256, 2),
    )


def digits_cnn() -> nn.Module:
    """The bundled digits network without its input scaling (the bench feeds raw 0..16 pixels)."""
    return nn.Sequential(*list(digits_model())[1:])


def mc_on(model: nn.Module) -> nn.Module:
    model.eval()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.train()
    return model


def against_baseline(tree: Path, pairs: int, rounds: int, out: str | None) -> None:
    """Alternate runs of the baseline checkout's benchmark and this one's (fresh processes)."""
    runs: dict[str, list[dict[str, float]]] = {"baseline": [], "this": []}
    for _ in range(pairs):
        for side, where in (("baseline", tree), ("this", ROOT)):
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "engine.json"
                cmd = [sys.executable, "-m", "bench.engine", "--rounds", str(rounds)]
                env = {**os.environ, "PYTHONPATH": str(where)}  # its own code only
                subprocess.run([*cmd, "--json", str(path)], cwd=where, env=env, check=True,
                               stdout=subprocess.DEVNULL)  # fmt: skip
                runs[side].append(json.loads(path.read_text())["median_ms"])
            print(side, runs[side][-1], flush=True)
    result = {
        "machine": machine(),
        "date": now(),
        "baseline_tree": str(tree),
        "rounds_per_run": rounds,
        "runs_ms": runs,
        "median_of_runs_ms": {
            side: {k: round(statistics.median(r[k] for r in rs), 3) for k in rs[0]}
            for side, rs in runs.items()
        },
    }
    print(json.dumps(result["median_of_runs_ms"], indent=2))
    if out:
        Path(out).write_text(json.dumps(result, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--json", default=None)
    ap.add_argument("--baseline-tree", type=Path, default=None)
    ap.add_argument("--pairs", type=int, default=3)
    args = ap.parse_args()
    if args.baseline_tree is not None:
        return against_baseline(args.baseline_tree.resolve(), args.pairs, args.rounds, args.json)
    torch.manual_seed(0)
    mlp = reference_mlp().eval()
    x = torch.randn(B, 30)
    xs = x.numpy()
    engine = MCSampler(mlp, x, device="cpu")
    engine_torch_masks = MCSampler(mlp, x, device="cpu", fused=False)
    naive_model = mc_on(reference_mlp())
    naive_model.load_state_dict(mlp.state_dict())
    plain = reference_mlp().eval()
    plain.load_state_dict(mlp.state_dict())
    a_ = torch.randn(2048, 2048)
    b_ = torch.randn(2048, 2048)

    def loop() -> None:
        with torch.inference_mode():
            for _ in range(T):
                naive_model(x)

    def naive() -> None:
        with torch.inference_mode():
            naive_model(x.repeat(T, 1))

    def eng() -> None:
        engine.run([MCRequest(xs, T, 1)])

    def eng_torch_masks() -> None:
        engine_torch_masks.run([MCRequest(xs, T, 1)])

    def dropout_off() -> None:
        with torch.inference_mode():
            plain(x.repeat(T, 1))

    def matmul() -> None:
        torch.mm(a_, b_)

    cnn = digits_cnn().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        cnn.train()
        cnn(torch.rand(256, 1, 8, 8) * 16)
        cnn.eval()
    img = torch.rand(B, 1, 8, 8) * 16
    cnn_engine = MCSampler(cnn, img, device="cpu")
    cnn_engine_torch_masks = MCSampler(cnn, img, device="cpu", fused=False)

    def cnn_mc() -> None:
        cnn_engine.run([MCRequest(img.numpy(), T, 1)])

    def cnn_mc_torch_masks() -> None:
        cnn_engine_torch_masks.run([MCRequest(img.numpy(), T, 1)])

    def cnn_prefix() -> None:
        with torch.inference_mode():
            cnn_engine.prefix(img)

    def cnn_det() -> None:
        with torch.inference_mode():
            cnn(img)

    variants = {
        "loop": loop,
        "naive": naive,
        "engine": eng,
        "engine_torch_masks": eng_torch_masks,
        "dropout_off": dropout_off,
        "matmul": matmul,
        "cnn_engine": cnn_mc,
        "cnn_engine_torch_masks": cnn_mc_torch_masks,
        "cnn_engine_prefix": cnn_prefix,
        "cnn_det": cnn_det,
    }
    for fn in variants.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    shuffle = random.Random(20261127)
    for _ in range(args.rounds):
        # A fresh random order every round (fixed seed): a variant's predecessor, whose data
        # evicts its caches, changes from round to round. (Rotating one fixed order, as before
        # 2026-11-27 04:30 UTC, kept every neighbour: the CNN engine ran right after the 48 MB
        # matmul in most rounds, the deterministic pass after the CNN prefix.)
        for k in shuffle.sample(names, len(names)):
            times[k].append(timed(variants[k], repeat=1 if k in ("loop", "matmul") else 5))
    med = {k: median(v) for k, v in times.items()}
    rows = T * B
    rate = {
        k: rows / med[k] for k in ("loop", "naive", "engine", "engine_torch_masks", "dropout_off")
    }
    rate["matmul_ceiling"] = 2 * 2048**3 / med["matmul"] / FLOPS_PER_ROW
    result = {
        "machine": machine(),
        "date": now(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "order": "random per round (seed 20261127)",
        "median_ms": {k: round(v * 1e3, 3) for k, v in med.items()},
        "samples_per_s": {k: round(v) for k, v in rate.items()},
        "engine_vs_naive": round(rate["engine"] / rate["naive"], 2),
        "engine_vs_ceiling": round(rate["engine"] / rate["matmul_ceiling"], 3),
        "naive_vs_ceiling": round(rate["naive"] / rate["matmul_ceiling"], 3),
        "cnn_engine_vs_one_deterministic_pass": round(med["cnn_engine"] / med["cnn_det"], 2),
        "cnn_engine_torch_masks_vs_one_deterministic_pass": round(
            med["cnn_engine_torch_masks"] / med["cnn_det"], 2
        ),
        "cnn_engine_vs_its_prefix": round(med["cnn_engine"] / med["cnn_engine_prefix"], 2),
        "prefix_rewrites": cnn_engine.prefix.rewrites,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
