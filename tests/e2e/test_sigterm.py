"""Graceful shutdown of a real server process under concurrent load.

SIGTERM: readiness fails at once; the server keeps serving through the grace window; requests
in flight at the signal and every request sent before the end of the window get good answers
(the client never retries); then the process drains and exits 0.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from server import serve

# Timed against the drain grace: run alone (the Makefile's serial phase).
pytestmark = pytest.mark.serial

GRACE_S = 2.0
CLIENTS = 16
BODY = {
    "instances": [[[[float((r * 8 + c) % 17) for c in range(8)] for r in range(8)]]],
    "parameters": {"samples": 1000},
}


def test_sigterm_drains_without_losing_a_request(tmp_path: Path) -> None:
    env = {"MCSERVE_DRAIN_GRACE_S": str(GRACE_S), "MCSERVE_DRAIN_TIMEOUT_S": "20"}
    env["MCSERVE_COMPUTE_PROCESS"] = "true"  # the default: the process drains with the server
    with serve(tmp_path, env=env) as srv:
        records: list[tuple[float, float, int]] = []  # (sent, answered, status)
        lock = threading.Lock()
        stop_sending = threading.Event()

        def client() -> None:
            # httpx does not retry: one send per request, so every answer is the first try.
            with httpx.Client(base_url=srv.url, timeout=30) as c:
                while not stop_sending.is_set():
                    sent = time.monotonic()
                    try:
                        status = c.post("/v1/models/digits:predict", json=BODY).status_code
                    except httpx.HTTPError:
                        status = -1
                    with lock:
                        records.append((sent, time.monotonic(), status))

        threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
        for t in threads:
            t.start()
        time.sleep(1.0)  # steady load
        t_signal = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        with httpx.Client(base_url=srv.url, timeout=5) as probe:
            ready = probe.get("/readyz")
        assert ready.status_code == 503 and ready.json()["reasons"] == ["shutting down"]
        # Keep sending until shortly before the grace window closes, then let answers arrive.
        time.sleep(GRACE_S - 0.4)
        stop_sending.set()
        for t in threads:
            t.join(60)
        exit_code = srv.proc.wait(60)
        log = srv.output()
    assert exit_code == 0, log
    in_flight = [r for r in records if r[0] < t_signal < r[1]]
    assert in_flight, "no request was in flight at the signal"
    sent_in_window = [r for r in records if r[0] < t_signal + GRACE_S]
    assert len(sent_in_window) == len(records)
    failed = [r for r in records if r[2] != 200]
    assert failed == [], failed[:5]
    after_signal = [r for r in records if r[0] > t_signal]
    assert after_signal, "no request was sent during the grace window"
