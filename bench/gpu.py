"""GPU check and benchmark: one prepared script, finishing in under 5 minutes.

    python -m bench.gpu [--device cuda|cpu] [--quick] [--out FILE.json]

Needs only the engine's runtime dependencies (torch, numpy, safetensors): the bundled models are
rebuilt from their declarative architecture without pydantic, FastAPI or onnxruntime.
1. CPU and device agree: the masks are the same integers on both (counter-based), so the
   samples differ only by float rounding; means are also compared within sampling error.
2. Seeded results on the device do not depend on batch composition (bit for bit), with the
   engine's default (fixed forward shapes on CUDA) and, for information, with variable shapes.
3. T=1,000 passes for breast-cancer and digits at batch 1 to 1,024: median ms and samples/s,
   eager and with the chunk function compiled (torch.compile; CUDA graphs on CUDA). A text
   model (`--models medical-abstracts`, or `--text`) takes token ids (drawn from its smallest
   embedding's vocabulary, padded like a real text to about half its max_tokens) at T = 20,
   the passes a text request uses, at batch 1 to 64.
4. Optional low precision (bf16/fp16 autocast): speed and the accuracy loss against float32.
5. `--service` (needs pydantic and orjson as well): the serving path on the device, every bundled
   model through `ServedModel` and the dynamic `Batcher` (no HTTP): 24 concurrent seeded requests
   share forwards and their encoded answers equal those of the same requests alone, byte for byte.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from service.bundle.architecture import rebuild
from service.engine.sampler import MCRequest, MCSampler

ROOT = Path(__file__).resolve().parents[1]
ROW_BUDGET = 1 << 14  # the service's default (settings.row_budget): what it would run


def newest(model_dir: Path) -> Path:
    versions = [p for p in model_dir.iterdir() if (p / "manifest.json").is_file()]
    return max(versions, key=lambda p: [int(s) if s.isdigit() else s for s in p.name.split(".")])


def load(name: str) -> tuple[torch.nn.Module, list[int]]:
    path = newest(ROOT / "models" / name)
    manifest = json.loads((path / "manifest.json").read_text())
    desc = json.loads((path / "architecture.json").read_text())
    return rebuild(desc, load_file(str(path / "weights.safetensors"))), manifest["inputs"]["shape"]


def is_text(module: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.Embedding) for m in module.modules())


def inputs(module: torch.nn.Module, shape: list[int], n: int, seed: int) -> np.ndarray:
    """n inputs: uniform floats, or for a text model token ids from the smallest embedding's
    vocabulary with the second half of each row padding (id 0), as a real text of about half
    the maximum length arrives."""
    rng = np.random.default_rng(seed)
    if not is_text(module):
        return rng.uniform(0, 1, size=(n, *shape)).astype(np.float32)
    vocab = min(m.num_embeddings for m in module.modules() if isinstance(m, torch.nn.Embedding))
    ids = rng.integers(1, vocab, size=(n, *shape), dtype=np.int64)
    ids[:, shape[-1] // 2 :] = 0
    return ids


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Any, device: torch.device, repeats: int) -> float:
    fn()
    sync(device)
    # As the service does after start-up: full collections over the objects that torch.compile
    # leaves took ~40 ms each and landed inside timed calls (seen on an H200).
    gc.collect()
    gc.freeze()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def agreement(name: str, device: torch.device, passes: int) -> dict[str, Any]:
    module, shape = load(name)
    x = inputs(module, shape, 8, 0)
    cpu = MCSampler(module, torch.as_tensor(x), device="cpu").run([MCRequest(x, passes, 7)])[0]
    module, _ = load(name)
    dev = MCSampler(module, torch.as_tensor(x), device=device).run([MCRequest(x, passes, 7)])[0]
    a, b = cpu.astype(np.float64), dev.astype(np.float64)
    se = np.sqrt(a.var(0) / passes + b.var(0) / passes) + 1e-12
    z = np.abs(a.mean(0) - b.mean(0)) / se
    return {
        "max_abs_sample_diff": float(np.abs(a - b).max()),
        "max_mean_z": float(z.max()),
        "ok": bool(z.max() < 4.5),
    }


def batch_independent(
    name: str, device: torch.device, min_rows: int | None = None, compile_mode: str | None = None
) -> dict[str, Any]:
    module, shape = load(name)
    xs = [inputs(module, shape, n, 1 + n) for n in (1, 3, 5)]
    sampler = MCSampler(
        module,
        torch.as_tensor(xs[0]),
        device=device,
        row_budget=ROW_BUDGET,
        min_rows=min_rows,
        compile_mode=compile_mode,
    )
    reqs = [MCRequest(x, 50, seed) for x, seed in zip(xs, (11, 12, 13), strict=True)]
    alone = [sampler.run([r])[0] for r in reqs]
    together = sampler.run(reqs)
    same = all(np.array_equal(a, b) for a, b in zip(alone, together, strict=True))
    return {"ok": bool(same)}


def speed(
    name: str,
    device: torch.device,
    passes: int,
    batches: list[int],
    repeats: int,
    dtype: str,
    compile_mode: str | None = None,
    min_rows: int | None = None,
    row_budget: int = ROW_BUDGET,
) -> list[dict[str, Any]]:
    module, shape = load(name)
    sampler = MCSampler(
        module,
        torch.as_tensor(inputs(module, shape, 2, 0)),
        device=device,
        row_budget=row_budget,
        compile_mode=compile_mode,
        min_rows=min_rows,
    )
    out = []
    for b in batches:
        x = inputs(module, shape, b, b)
        req = [MCRequest(x, passes, 3)]

        def run(req: list[MCRequest] = req) -> None:
            if dtype == "float32":
                sampler.run(req)
            else:
                with torch.autocast(device_type=device.type, dtype=getattr(torch, dtype)):
                    sampler.run(req)

        secs = timed(run, device, repeats)
        out.append(
            {
                "batch": b,
                "median_ms": round(secs * 1e3, 3),
                "samples_per_s": round(b * passes / secs),
            }
        )
    return out


def _probabilities(logits: np.ndarray) -> np.ndarray:
    """Mean predictive probabilities over passes (sigmoid for one logit, else softmax)."""
    if logits.shape[-1] == 1:
        p = 1.0 / (1.0 + np.exp(-logits))
    else:
        z = np.exp(logits - logits.max(-1, keepdims=True))
        p = z / z.sum(-1, keepdims=True)
    return p.mean(0)


def precision_loss(name: str, device: torch.device, dtype: str, passes: int) -> dict[str, Any]:
    """Low precision against float32 on the same masks: what a user of the answer would see."""
    module, shape = load(name)
    x = inputs(module, shape, 64, 2)
    sampler = MCSampler(module, torch.as_tensor(x), device=device)
    ref = sampler.run([MCRequest(x, passes, 5)])[0].astype(np.float64)
    with torch.autocast(device_type=device.type, dtype=getattr(torch, dtype)):
        low = sampler.run([MCRequest(x, passes, 5)])[0].astype(np.float64)
    p_ref, p_low = _probabilities(ref), _probabilities(low)
    return {
        "max_abs_logit_mean_diff": float(np.abs(ref.mean(0) - low.mean(0)).max()),
        "max_abs_probability_diff": float(np.abs(p_ref - p_low).max()),
        "label_agreement": float((p_ref.argmax(-1) == p_low.argmax(-1)).mean())
        if p_ref.shape[-1] > 1
        else float(((p_ref > 0.5) == (p_low > 0.5)).mean()),
    }


def service_check(device: torch.device, passes: int) -> dict[str, Any]:
    """The serving path (bundle trust checks, ServedModel, Batcher, encoder) on `device`."""
    import asyncio
    import csv
    from concurrent.futures import ThreadPoolExecutor

    from service.bundle import TrustPolicy, load_bundle
    from service.encode import response_json
    from service.engine.batcher import Batcher
    from service.engine.model import ServedModel
    from service.engine.params import PredictParams

    async def one_model(name: str) -> dict[str, Any]:
        model = ServedModel(
            load_bundle(newest(ROOT / "models" / name), TrustPolicy()), device=device
        )
        with (ROOT / "models" / "data" / f"{name}-test.csv").open() as f:
            rows = [[float(v) for k, v in r.items() if k != "target"] for r in csv.DictReader(f)]
        shape = model.manifest.inputs.shape
        x = np.asarray(rows[:48], dtype=np.float32).reshape(-1, *shape)
        requests = [
            (x[i : i + 1 + i % 3], PredictParams(passes, (0.9,), 100 + i)) for i in range(24)
        ]
        executor = ThreadPoolExecutor(1)
        batcher = Batcher(model, executor)
        batcher.start()
        try:
            started = time.perf_counter()
            together = await asyncio.gather(*(batcher.submit(xi, p) for xi, p in requests))
            shared_s = time.perf_counter() - started
            forwards = model.sampler.stats.forwards
            alone = [await batcher.submit(xi, p) for xi, p in requests]
        finally:
            await batcher.stop()
            executor.shutdown()
        same = all(
            response_json(model, a) == response_json(model, b)
            for a, b in zip(alone, together, strict=True)
        )
        return {
            "device": model.device,
            "answers_equal_alone_and_shared": bool(same),
            "forwards_for_24_concurrent": forwards,
            "seconds_for_24_concurrent": round(shared_s, 4),
            "ok": bool(same) and forwards < 24,
        }

    async def run() -> dict[str, Any]:
        return {n: await one_model(n) for n in ("breast-cancer", "diabetes", "digits")}

    return asyncio.run(run())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run for tests")
    ap.add_argument("--low-precision", default="bfloat16", choices=["bfloat16", "float16", "none"])
    ap.add_argument("--models", default="breast-cancer,digits")
    ap.add_argument("--text", action="store_true", help="also the text model (medical-abstracts)")
    ap.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time torch.compile (after it, eager timings in the same process got noisy)",
    )
    ap.add_argument("--service", action="store_true", help="also check the serving path")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    repeats = 2 if args.quick else 7
    names = args.models.split(",") + (["medical-abstracts"] if args.text else [])
    started = time.perf_counter()
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "passes": {},
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "checks": {},
        "speed": {},
    }
    compiled = "reduce-overhead" if device.type == "cuda" else "default"
    for name in names:
        print(f"[{time.perf_counter() - started:6.1f} s] {name}", file=sys.stderr, flush=True)
        text = is_text(load(name)[0])
        # A text request runs T = 20 (each row holds hundreds of tokens); tabular T = 1,000.
        passes = (5 if args.quick else 20) if text else (50 if args.quick else 1000)
        batches = [1, 4] if args.quick else [1, 4, 16, 64] if text else [1, 4, 16, 64, 256, 1024]
        report["passes"][name] = passes
        report["checks"][name] = {
            "cpu_vs_device": agreement(name, device, (20 if text else 200) if args.quick else 2000),
            "batch_independent": batch_independent(name, device),
            "batch_independent_variable_shapes (information)": batch_independent(
                name, device, min_rows=64
            ),
        }
        report["speed"][name] = {
            "float32": speed(name, device, passes, batches, repeats, "float32"),
            "float32 variable shapes (min_rows=64)": speed(
                name, device, passes, batches, repeats, "float32", min_rows=64
            ),
            "float32 row budget 65536": speed(
                name, device, passes, batches, repeats, "float32", row_budget=1 << 16
            ),
        }
        if args.low_precision != "none" and (device.type == "cuda" or args.quick):
            report["speed"][name][args.low_precision] = speed(
                name, device, passes, batches, repeats, args.low_precision
            )
            report["checks"][name]["precision_loss"] = precision_loss(
                name, device, args.low_precision, 100
            )
        if not args.compile:
            continue
        try:  # a compiler failure is reported, not fatal: eager is what the service runs
            started_compile = time.perf_counter()
            report["checks"][name]["batch_independent_compiled"] = batch_independent(
                name, device, compile_mode=compiled
            )
            report["speed"][name][f"float32 compiled ({compiled})"] = speed(
                name, device, passes, batches, repeats, "float32", compiled
            )
            report["checks"][name]["compile_and_speed_seconds"] = round(
                time.perf_counter() - started_compile, 1
            )
        except Exception as exc:  # any compiler error is recorded as such
            report["checks"][name]["compile_error"] = f"{type(exc).__name__}: {exc}"[:2000]
    if args.service:
        report["service"] = service_check(device, 100)
    report["seconds"] = round(time.perf_counter() - started, 1)
    ok = all(
        c["cpu_vs_device"]["ok"]
        and c["batch_independent"]["ok"]
        and c.get("batch_independent_compiled", {"ok": True})["ok"]
        for c in report["checks"].values()
    ) and all(c["ok"] for c in report.get("service", {}).values())
    report["ok"] = ok
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
