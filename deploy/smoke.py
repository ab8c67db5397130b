"""Smoke test run inside the container image by `make image-smoke` (standard library only).

It starts the server the way the image's entry point does, waits for readiness, checks liveness
and the Open Inference Protocol health routes (KServe's probes), asks for one prediction and
stops the server with SIGTERM, expecting a clean exit. Each step prints one line; the first
failure exits non-zero with the server's log tail.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import NoReturn

READY_TIMEOUT_S = 180.0
# the first row of the Wisconsin breast cancer data set (30 features, raw units)
BREAST_CANCER_ROW = [
    17.99, 10.38, 122.8, 1001.0, 0.1184, 0.2776, 0.3001, 0.1471, 0.2419, 0.07871,
    1.095, 0.9053, 8.589, 153.4, 0.006399, 0.04904, 0.05373, 0.01587, 0.03003, 0.006193,
    25.38, 17.33, 184.6, 2019.0, 0.1622, 0.6656, 0.7119, 0.2654, 0.4601, 0.1189,
]  # fmt: skip
LOG_PATH = "/tmp/mcserve-smoke.log"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def request(url: str, body: object = None, timeout: float = 30.0) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    headers = {} if body is None else {"Content-Type": "application/json"}
    req = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def fail(message: str, server: subprocess.Popen[bytes] | None = None) -> NoReturn:
    print(f"smoke: FAIL: {message}", flush=True)
    if server is not None and server.poll() is None:
        server.kill()
    try:
        with open(LOG_PATH, encoding="utf-8", errors="replace") as log:
            tail = log.read()[-4000:]
        print(f"--- server log (tail) ---\n{tail}", flush=True)
    except OSError:
        pass
    sys.exit(1)


def wait_ready(base: str, server: subprocess.Popen[bytes]) -> float:
    start = time.monotonic()
    while time.monotonic() - start < READY_TIMEOUT_S:
        if server.poll() is not None:
            fail(f"server exited with {server.returncode} before it was ready", server)
        try:
            status, _ = request(f"{base}/readyz", timeout=2.0)
            if status == 200:
                return time.monotonic() - start
        except OSError:
            pass
        time.sleep(0.5)
    fail(f"/readyz not 200 within {READY_TIMEOUT_S:.0f} s", server)


def main() -> None:
    import service  # installed in the image's venv, not beside this script

    print(f"smoke: import service ok ({service.__file__})", flush=True)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    grace = float(os.environ.get("MCSERVE_DRAIN_GRACE_S", "1"))
    drain = float(os.environ.get("MCSERVE_DRAIN_TIMEOUT_S", "10"))
    env = dict(
        os.environ,
        MCSERVE_HOST="127.0.0.1",
        MCSERVE_PORT=str(port),
        MCSERVE_DRAIN_GRACE_S=str(grace),
        MCSERVE_DRAIN_TIMEOUT_S=str(drain),
    )
    with open(LOG_PATH, "wb") as log:
        # the image's ENTRYPOINT + CMD, with settings from the environment only
        server = subprocess.Popen(
            [sys.executable, "-m", "service", "serve"], env=env, stdout=log, stderr=log
        )
    ready_s = wait_ready(base, server)
    print(f"smoke: /readyz 200 after {ready_s:.1f} s", flush=True)

    for path in ("/healthz", "/v2/health/live", "/v2/health/ready"):
        status, _ = request(f"{base}{path}")
        if status != 200:
            fail(f"{path} answered {status}", server)
    print("smoke: /healthz, /v2/health/live, /v2/health/ready 200", flush=True)

    body = {"instances": [BREAST_CANCER_ROW]}
    status, raw = request(f"{base}/v1/models/breast-cancer:predict", body)
    if status != 200:
        fail(f"predict answered {status}: {raw[:500]!r}", server)
    predictions = json.loads(raw).get("predictions")
    if not isinstance(predictions, list) or len(predictions) != 1:
        fail(f"predict: expected one prediction, got {raw[:500]!r}", server)
    print(f"smoke: predict 200: {json.dumps(predictions[0])[:300]}", flush=True)

    # the page shows the bundle's held-out evaluation, which the image carries beside the bundles
    status, raw = request(f"{base}/models/breast-cancer")
    if status != 200 or b"Held-out evaluation of this bundle" not in raw:
        fail(f"/models/breast-cancer answered {status} without its evaluation", server)
    print("smoke: /models/breast-cancer 200 with its held-out evaluation", flush=True)

    server.send_signal(signal.SIGTERM)
    try:
        rc = server.wait(timeout=grace + drain + 10)
    except subprocess.TimeoutExpired:
        fail("server still running after SIGTERM, grace and drain timeout", server)
    if rc != 0:
        fail(f"server exited with {rc} after SIGTERM (expected 0)")
    print("smoke: SIGTERM -> exit 0", flush=True)
    print("smoke: OK", flush=True)


if __name__ == "__main__":
    main()
