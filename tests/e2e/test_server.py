"""End to end against a real server process: start, ready, predict on every bundled model, stop."""

from __future__ import annotations

import csv
import json
import re
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
from server import ROOT, serve

# Wall-clock bounds on deadlines and turns: run alone (the Makefile's serial phase).
pytestmark = pytest.mark.serial


def first_row(name: str) -> dict[str, float]:
    with (ROOT / "models" / "data" / f"{name}-test.csv").open() as f:
        row = next(csv.DictReader(f))
    row.pop("target")
    return {k: float(v) for k, v in row.items()}


def _abstracts(c: httpx.Client, n: int, samples: int) -> httpx.Response:
    with (ROOT / "models" / "data" / "medical-abstracts-test.csv").open() as f:
        texts = [row["text"] for row, _ in zip(csv.DictReader(f), range(n), strict=False)]
    body = {"instances": texts, "parameters": {"samples": samples}}
    return c.post("/v1/models/medical-abstracts:predict", json=body)


def _a_deadline_stops_compute(c: httpx.Client) -> None:
    """64 abstracts x 1,000 passes take about 12 s here. timeout_ms bounded only the queue: the
    answer came after all of them, 200. The compute now stops at the deadline: 504 at once."""
    with (ROOT / "models" / "data" / "medical-abstracts-test.csv").open() as f:
        texts = [row["text"] for row, _ in zip(csv.DictReader(f), range(64), strict=False)]
    body = {"instances": texts, "parameters": {"samples": 1000, "timeout_ms": 1000}}
    start = time.monotonic()
    r = c.post("/v1/models/medical-abstracts:predict", json=body)
    took = time.monotonic() - start
    assert r.status_code == 504, r.text[:300]
    # Its deadline's timer answers it in one of its turns, between two (service/engine/turns.py)
    # or, on a slow machine, before its first turn has landed.
    said = r.json()["error"]
    assert re.search("deadline passed (during turns|between turns|before its batch)", said)
    assert took < 6.0, took
    short = {"instances": texts[:1], "parameters": {"samples": 20}}
    assert c.post("/v1/models/medical-abstracts:predict", json=short).status_code == 200
    # A client that gives up (no timeout_ms; it closes the connection after 1 s) stopped no
    # compute: the next request waited behind the other 11 s. Now its compute stops too.
    del body["parameters"]["timeout_ms"]
    with (
        httpx.Client(base_url=str(c.base_url), timeout=1.0) as impatient,
        pytest.raises(httpx.ReadTimeout),
    ):
        impatient.post("/v1/models/medical-abstracts:predict", json=body)
    start = time.monotonic()
    assert c.post("/v1/models/medical-abstracts:predict", json=short).status_code == 200
    assert time.monotonic() - start < 4.0
    _a_long_request_goes_in_turns(c, texts, short)


def _a_long_request_goes_in_turns(c: httpx.Client, texts: list[str], short: object) -> None:
    """A client that waits for its long request (64 abstracts x 300 passes, about 4 s here) no
    longer holds the next request for all of it: the long one runs in turns of about 1 s
    (service/engine/turns.py), and the short one goes between two of them."""
    body = {"instances": texts, "parameters": {"samples": 300, "seed": 4}}
    done: dict[str, float] = {}

    def run_long() -> None:
        with httpx.Client(base_url=str(c.base_url), timeout=60) as other:
            r = other.post("/v1/models/medical-abstracts:predict", json=body)
        assert r.status_code == 200, r.text[:300]
        done["long"] = time.monotonic()

    thread = threading.Thread(target=run_long)
    thread.start()
    time.sleep(0.5)
    start = time.monotonic()
    assert c.post("/v1/models/medical-abstracts:predict", json=short).status_code == 200
    done["short"] = time.monotonic()
    thread.join()
    assert "long" in done, "the long request failed"
    assert done["short"] < done["long"] - 0.5, done  # before it, not after all its passes
    assert done["short"] - start < 2.5


def _half_sent_body(port: int) -> socket.socket:
    """A request whose body stops halfway: it waits in no batcher, reading its body."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = "POST /v1/models/diabetes:predict HTTP/1.1\r\nHost: x\r\n"
    head += "Content-Type: application/json\r\nContent-Length: 400\r\n\r\n"
    sock.sendall(head.encode() + b'{"instances": [')
    return sock


def _answer(sock: socket.socket) -> bytes:
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def test_start_ready_predict_stop(tmp_path: Path) -> None:
    env = {"MCSERVE_DRAIN_GRACE_S": "0", "MCSERVE_COMPUTE_PROCESS": "true"}  # as deployed
    env["MCSERVE_DRAIN_TIMEOUT_S"] = "2"  # shorter than the last request's compute
    env["MCSERVE_REFERAL"] = "{}"  # a typo: warned about, in the log's own format
    with serve(tmp_path, env=env) as srv:
        compute = srv.children()
        assert len(compute) == 1  # the compute process (no audit writer here)
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            models = {m["name"]: m["ready"] for m in c.get("/v1/models").json()["models"]}
            assert models == {
                "breast-cancer": True,
                "diabetes": True,
                "digits": True,
                "medical-abstracts": True,
            }
            bc = c.post(
                "/v1/models/breast-cancer:predict",
                json={
                    "instances": [first_row("breast-cancer")],
                    "parameters": {"samples": 100, "seed": 1},
                },
            )
            assert bc.status_code == 200, bc.text
            assert set(bc.json()["predictions"][0]["probabilities"]) == {"malignant", "benign"}
            # The newest version is served: 2, the calibrated copy (prediction set, referral).
            assert bc.json()["model"]["version"] == "2"
            assert bc.json()["predictions"][0]["prediction_set"]["level"] == 0.95
            assert isinstance(bc.json()["predictions"][0]["referral"]["refer"], bool)
            diab = c.post(
                "/v1/models/diabetes:predict", json={"instances": [first_row("diabetes")]}
            )
            assert diab.status_code == 200, diab.text
            p = diab.json()["predictions"][0]
            assert p["std"] > 0 and p["intervals"][0]["lower"] < p["mean"]
            assert p["intervals"][0]["method"] == "conformal"  # version 2's default
            pixels = list(first_row("digits").values())
            image = [[pixels[r * 8 : r * 8 + 8] for r in range(8)]]
            dig = c.post("/v1/models/digits:predict", json={"instances": [image]})
            assert dig.status_code == 200, dig.text
            assert len(dig.json()["predictions"][0]["probabilities"]) == 10
            _a_deadline_stops_compute(c)
            # A request still computing when the drain time runs out answers 503 and says why
            # (uvicorn cancelled it: a 500 with a traceback in the log), and so does one in no
            # batcher (its body still arriving).
            late: dict[str, httpx.Response] = {}
            thread = threading.Thread(target=lambda: late.update(r=_abstracts(c, 64, 1000)))
            thread.start()
            slow = _half_sent_body(srv.port)
            time.sleep(0.5)
            srv.proc.send_signal(signal.SIGTERM)
            thread.join(30)
            answer = _answer(slow)
            slow.close()
        assert srv.proc.wait(60) == 0, srv.output()
        assert late["r"].status_code == 503, late["r"].text
        assert "drain time (MCSERVE_DRAIN_TIMEOUT_S) ran out" in late["r"].json()["error"]
        assert answer.startswith(b"HTTP/1.1 503 "), answer
        assert b"drain time (MCSERVE_DRAIN_TIMEOUT_S) ran out" in answer, answer
        assert "Traceback" not in srv.output() and "Exception in ASGI" not in srv.output()
        # One JSON object a line, the settings' warnings too (a plain "warning: ..." line
        # before the log was configured broke it).
        records = [json.loads(line) for line in srv.output().splitlines() if line.strip()]
        assert any(
            r["level"] == "warning" and r["msg"].startswith("settings: MCSERVE_REFERAL is not a")
            for r in records
        )
        assert not Path(f"/proc/{compute[0]}").exists()  # it stopped with the server
