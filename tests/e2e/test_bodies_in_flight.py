"""Request bodies in flight against a real server's `max_inflight_body_bytes` (G3 of the audio
review: 64 clients' 6 MB WAV files took a server over its pod's memory limit): bodies still
arriving hold their bytes, a chunked body that passes the limit is a 429 naming the setting as
it arrives, a declared one that cannot fit is refused before its body is sent, the held ones
are answered when their bodies end, and nothing stays counted."""

from __future__ import annotations

import contextlib
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import orjson
from prometheus_client.parser import text_string_to_metric_families
from server import ROOT, serve

ROW = [59.0, 2.0, 32.1, 101.0, 157.0, 93.2, 38.0, 4.0, 4.8598, 87.0]  # diabetes
SIZE = 1_000_000  # each body: one instance padded with spaces (valid JSON)
SENT_FIRST = 900_000  # what the held requests send before they pause
LIMIT = 2_500_000  # two held bodies fit (1.8 MB), a third does not


def _head(size: int, extra: bytes = b"") -> bytes:
    return (
        b"POST /v1/models/diabetes:predict HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n%s\r\n" % (size, extra)
    )


def _chunked(body: bytes, size: int = 65536) -> bytes:
    head = (
        b"POST /v1/models/diabetes:predict HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    parts = [
        b"%x\r\n%s\r\n" % (len(c), c)
        for c in (body[i : i + size] for i in range(0, len(body), size))
    ]
    return head + b"".join(parts) + b"0\r\n\r\n"


def _scrape(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith(("mcserve_body", "mcserve_bodies"))
    }


def _wait_for(url: str, name: str, value: float) -> dict[str, float]:
    deadline = time.monotonic() + 10
    while True:
        seen = _scrape(url)
        if seen[name] == value or time.monotonic() > deadline:
            return seen
        time.sleep(0.05)


def _reply(s: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536)
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    while len(body) < int(headers["content-length"]):
        body += s.recv(65536)
    return int(lines[0].split()[1]), headers, body


def test_bodies_in_flight_are_capped_and_given_back(tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(ROOT / "models" / "diabetes" / "1", models / "diabetes" / "1")
    env = {
        "MCSERVE_MAX_BODY_BYTES": str(SIZE),
        "MCSERVE_MAX_INFLIGHT_BODY_BYTES": str(LIMIT),
        "MCSERVE_COMPUTE_PROCESS": "false",
        "MCSERVE_FUSED_MASKS": "false",
    }
    body = orjson.dumps({"instances": [ROW]})
    body += b" " * (SIZE - len(body))
    with serve(tmp_path, model_dir=models, env=env) as srv:
        held = [socket.create_connection(("127.0.0.1", srv.port), timeout=10) for _ in range(2)]
        try:
            for s in held:
                s.sendall(_head(SIZE) + body[:SENT_FIRST])
            seen = _wait_for(srv.url, "mcserve_body_bytes_in_flight", 2 * SENT_FIRST)
            assert seen["mcserve_body_bytes_in_flight"] == 2 * SENT_FIRST, seen
            # A third body, chunked (no length declared), passes the limit part way: refused
            # while it arrives, and what it held is given back.
            with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as third:
                # Sent from a thread: the server stops reading once it has answered.
                sender = threading.Thread(
                    target=lambda: _send_quietly(third, _chunked(body)), daemon=True
                )
                sender.start()
                status, headers, said = _reply(third)
            assert status == 429 and headers["retry-after"] == "1", said
            error = orjson.loads(said)["error"]
            assert "setting max_inflight_body_bytes" in error, error
            assert f"its limit ({LIMIT} bytes" in error
            seen = _wait_for(srv.url, "mcserve_body_bytes_in_flight", 2 * SENT_FIRST)
            assert seen["mcserve_body_bytes_in_flight"] == 2 * SENT_FIRST  # its own given back
            assert seen["mcserve_bodies_refused_total"] == 1
            # A fourth declares its length and waits for 100 Continue (as curl does for large
            # bodies): refused before it sends a byte of its body.
            with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as fourth:
                fourth.sendall(_head(SIZE, b"Expect: 100-continue\r\n"))
                status, headers, said = _reply(fourth)
            assert status == 429 and headers["retry-after"] == "1", said
            assert _scrape(srv.url)["mcserve_bodies_refused_total"] == 2
            # The held requests finish their bodies and are answered in full.
            for s in held:
                s.sendall(body[SENT_FIRST:])
            for s in held:
                status, _, said = _reply(s)
                assert status == 200, said
                assert len(orjson.loads(said)["predictions"]) == 1
        finally:
            for s in held:
                s.close()
        seen = _wait_for(srv.url, "mcserve_body_bytes_in_flight", 0)
        assert seen == {
            "mcserve_body_bytes_in_flight": 0,
            "mcserve_body_bytes_limit": LIMIT,
            "mcserve_bodies_refused_total": 2,
        }


def _send_quietly(s: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):  # the server answered before the whole body was read
        s.sendall(data)
