"""Clients that open connections and send little or nothing (issue 27, finding 4), against a
real server process with a low open-file limit: they are closed in time and never crowd out
honest requests."""

from __future__ import annotations

import shutil
import socket
import time
from pathlib import Path

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server import ROOT, serve

# Timed against the server's header and body timeouts: run alone (the Makefile's serial phase).
pytestmark = pytest.mark.serial

NOFILE = 256  # the server's open-file limit: 400 connections would exhaust it
HELD = 400


def test_half_open_connections_are_closed_and_do_not_crowd_out_requests(tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(ROOT / "models" / "diabetes" / "1", models / "diabetes" / "1")
    env = {
        "MCSERVE_HEADER_TIMEOUT_S": "1",
        "MCSERVE_BODY_TIMEOUT_S": "1",
        "MCSERVE_COMPUTE_PROCESS": "false",
        "MCSERVE_FUSED_MASKS": "false",
        "MCSERVE_DRAIN_GRACE_S": "0",
    }
    with serve(tmp_path, model_dir=models, env=env, nofile=NOFILE) as srv:
        held = []
        try:
            for i in range(HELD):  # half send nothing, half a request head cut short
                s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
                if i % 2:
                    s.sendall(b"POST /v1/models/diabetes:predict HTTP/1.1\r\nHost: x\r\nCont")
                held.append(s)
            # Honest requests, each on a new connection, are answered while those are held.
            for _ in range(20):
                with httpx.Client(base_url=srv.url, timeout=5) as c:
                    assert c.get("/healthz").status_code == 200
            # Every held connection is closed by the server (evicted at once, or 408 after the
            # header timeout of 1 s), none later than the timeout plus slack.
            deadline = time.monotonic() + 3.0
            answers = []
            for s in held:
                s.settimeout(max(0.01, deadline - time.monotonic()))
                answers.append(s.recv(200))  # b"" once closed; socket.timeout fails the test
            assert any(a.startswith(b"HTTP/1.1 408 ") for a in answers)
            assert all(a == b"" or a.startswith(b"HTTP/1.1 408 ") for a in answers)
        finally:
            for s in held:
                s.close()
        with httpx.Client(base_url=srv.url, timeout=5) as c:
            assert c.get("/healthz").status_code == 200
        # A body that stops short: 408 after the body timeout, and the app saw a disconnect.
        with socket.create_connection(("127.0.0.1", srv.port), timeout=3) as s:
            s.sendall(
                b"POST /v1/models/diabetes:predict HTTP/1.1\r\nHost: x\r\n"
                b'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"inst'
            )
            reply = s.recv(1000)
        assert reply.startswith(b"HTTP/1.1 408 "), reply
        said = orjson.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]  # JSON, not plain text
        assert said.startswith("request body not received in 1 s (setting body_timeout_s)")
        # Answered or closed below the app, so never in requests_total: counted by reason.
        with httpx.Client(base_url=srv.url, timeout=5) as c:
            scrape = c.get("/metrics").text
        closed = {
            sample.labels["reason"]: sample.value
            for family in text_string_to_metric_families(scrape)
            for sample in family.samples
            if sample.name == "mcserve_connections_closed_total"
        }
        assert closed["body_timeout"] == 1 and closed["concurrency"] == 0, closed
        # The app saw that request begin: its access line says the 408 the client got, and it
        # is not counted as a request (it was a 499 in both: review SRE).
        statuses = {
            sample.labels["status"]
            for family in text_string_to_metric_families(scrape)
            for sample in family.samples
            if sample.name == "mcserve_requests_total" and sample.labels["model"] == "diabetes"
        }
        assert not statuses & {"408", "499"}, statuses
        assert '"status":408' in srv.output() and '"status":499' not in srv.output()
        assert closed["evicted"] + closed["header_timeout"] >= HELD, closed
        assert "Too many open files" not in srv.output()
        assert '"level":"error"' not in srv.output()
