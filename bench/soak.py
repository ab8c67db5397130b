"""Memory and soak: RSS per loaded model, and a long run at concurrency 64.

    python -m bench.soak [--minutes 10] [--model breast-cancer] [--out FILE.json]

RSS is read from /proc/<pid>/status (VmRSS, VmHWM for the peak). The soak passes when wrk sees no
error and the RSS at the end is within 5 % of the RSS after the first minute.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from bench.common import machine, now
from bench.load import LUA, ROOT, instance, start, stop


def rss_kib(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            key, value = line.split(":", 1)
            out[key] = int(value.split()[0])
    return out


def per_model() -> dict[str, dict[str, int]]:
    """RSS of a server with no model, then with each bundled model alone."""
    result = {}
    for name in [None, "breast-cancer", "diabetes", "digits"]:
        with tempfile.TemporaryDirectory() as tmp:
            if name:
                shutil.copytree(ROOT / "models" / name, Path(tmp) / name)
            # (Before 2026-11-27 this passed MCSERVE_MODEL_DIR, which start()'s --model-dir
            # flag overrode: every figure was the server with all three models.)
            proc, _ = start("mcserve", {}, model_dir=Path(tmp))
            time.sleep(1)
            result[name or "(no model)"] = rss_kib(proc.pid)
            stop(proc)
    return result


def soak(model: str, minutes: float, samples: int) -> dict[str, object]:
    proc, port = start("mcserve", {})
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as body:
        json.dump({"instances": [instance(model)], "parameters": {"samples": samples}}, body)
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(LUA.format(body=body.name))
    trace: list[tuple[float, int]] = []
    stop_sampling = threading.Event()

    def sample() -> None:
        t0 = time.monotonic()
        while not stop_sampling.wait(5):
            trace.append((round(time.monotonic() - t0, 1), rss_kib(proc.pid)["VmRSS"]))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    url = f"http://127.0.0.1:{port}/v1/models/{model}:predict"
    out = subprocess.run(
        ["wrk", "-t1", "-c64", f"-d{int(minutes * 60)}s", "--latency", "-s", script.name, url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    stop_sampling.set()
    sampler.join()
    peak = rss_kib(proc.pid)["VmHWM"]
    stop(proc)
    after_1min = next(r for t, r in trace if t >= 60) if minutes >= 1 else trace[0][1]
    end = trace[-1][1]
    errors = [line for line in out.splitlines() if "Non-2xx" in line or "Socket errors" in line]
    return {
        "wrk": out,
        "errors": errors,
        "rss_after_1min_kib": after_1min,
        "rss_end_kib": end,
        "rss_change": round(end / after_1min - 1, 4),
        "peak_rss_kib": peak,
        "trace": trace,
        "ok": not errors and abs(end / after_1min - 1) <= 0.05,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--model", default="breast-cancer")
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    report = {
        "machine": machine(),
        "date": now(),
        "rss_per_model_kib": per_model(),
        "soak": soak(args.model, args.minutes, args.samples),
    }
    print(json.dumps({k: v for k, v in report.items() if k != "soak"}, indent=1))
    s = report["soak"]
    assert isinstance(s, dict)
    print({k: s[k] for k in ("errors", "rss_after_1min_kib", "rss_end_kib", "rss_change", "ok")})
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
