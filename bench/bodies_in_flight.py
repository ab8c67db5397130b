"""A real server's memory with many large request bodies in flight, with the body budget
(`MCSERVE_MAX_INFLIGHT_BODY_BYTES`, its default) and without it (the limit set to 1 TiB).

    python -m bench.bodies_in_flight [--clients 16 64] [--duration 12] [--rounds 2]

The audio review's G3: `--clients` connections each send, over and over, one 6 MB WAV file
(16-bit mono, 16 kHz, 187 s, 5,998,044 bytes: the server cuts it to the model's 1 s clip)
base64 in a /v1 body of 8 MB, to bench/audio.py's keyword spotter (T = 20). A client answered
429 waits its Retry-After (1 s) and sends again. Every 20 ms the resident memory of the server
and its children (the compute process) is summed; reported per arm, medians over `--rounds` (a
fresh server each): the peak, answers 200 per second and 429s per second. The deployment's
memory limit is 2 GiB (deploy/base/deployment.yaml).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import torch

from bench.audio import FRONT, Spotter, _wav
from bench.common import children, machine, median, now
from bench.load import start, stop
from service.engine.audio import log_mel
from service.packaging import save

OFF = str(1 << 40)
SAMPLES = 2_999_000  # 16-bit: a 5,998,044-byte file, under the model's 6,000,000


def _rss(pid: int) -> int:
    total = 0
    for p in (pid, *children(pid)):
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * 4096
        except OSError:
            pass  # exited meanwhile
    return total


async def _client(port: int, request: bytes, until: float, counts: dict[int, int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.monotonic() < until:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
            await reader.readexactly(length)
            counts[status] = counts.get(status, 0) + 1
            if b"connection: close" in head.lower():
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            if status == 429:  # as a client should: after Retry-After
                retry = head.lower().split(b"retry-after: ", 1)[1].split(b"\r\n", 1)[0]
                await asyncio.sleep(float(retry))
    finally:
        writer.close()


def arm(model_dir: Path, limit: str | None, clients: int, duration: float) -> dict[str, Any]:
    env = {"MCSERVE_MAX_INFLIGHT_BODY_BYTES": limit} if limit else {}
    proc, port = start("mcserve", env, model_dir=model_dir)
    try:
        rng = np.random.default_rng(0)
        wav = _wav(np.clip(rng.normal(0, 0.1, SAMPLES), -1, 1))
        instances = [{"b64": base64.b64encode(wav).decode()}]
        body = orjson.dumps({"instances": instances, "parameters": {"samples": 20}})
        request = (
            b"POST /v1/models/k:predict HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
        ) + body
        peak, done = [_rss(proc.pid)], threading.Event()

        def sample() -> None:
            while not done.wait(0.02):
                peak.append(_rss(proc.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        counts: dict[int, int] = {}
        until = time.monotonic() + duration

        async def run() -> None:
            await asyncio.gather(*(_client(port, request, until, counts) for _ in range(clients)))

        began = time.monotonic()
        asyncio.run(run())
        took = time.monotonic() - began
        done.set()
        sampler.join()
        return {
            "peak_mib": max(peak) / 2**20,
            "idle_mib": peak[0] / 2**20,
            "ok_per_s": counts.get(200, 0) / took,
            "refused_per_s": counts.get(429, 0) / took,
            "other": {k: v for k, v in counts.items() if k not in (200, 429)},
        }
    finally:
        stop(proc)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--duration", type=float, default=12.0)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        x = torch.tensor(np.stack([log_mel(np.zeros(16000), FRONT)] * 4))
        save(
            Spotter().eval(), x, out_dir=Path(tmp), name="k", version="1",
            task="classification", labels=list("abcd"), intended_use="bench", audio=FRONT,
        )  # fmt: skip
        for clients in args.clients:
            for name, limit in (("no budget (1 TiB)", OFF), ("budget (default)", None)):
                runs = [arm(Path(tmp), limit, clients, args.duration) for _ in range(args.rounds)]
                row = {k: median([r[k] for r in runs]) for k in runs[0] if k != "other"}
                rows.append({"clients": clients, "arm": name, **row, "other": runs[0]["other"]})
    print(f"{machine()}, {now()}, {args.rounds} rounds of {args.duration:g} s, medians\n")
    print("| clients | arm | peak MiB (server + compute) | idle MiB | 200/s | 429/s |")
    print("|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['clients']} | {r['arm']} | {r['peak_mib']:.0f} | {r['idle_mib']:.0f} | "
            f"{r['ok_per_s']:.1f} | {r['refused_per_s']:.1f} |"
            + (f" other: {r['other']}" if r["other"] else "")
        )


if __name__ == "__main__":
    main()
