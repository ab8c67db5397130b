"""The audit writer process beside a real `python -m service serve`: a clean stop writes every
answered prediction; a killed server leaves no writer process behind."""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from pathlib import Path

import httpx
from server import serve

from bench.load import instance

BODY = {"instances": [instance("breast-cancer")], "parameters": {"samples": 20}}


def _command(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def _gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state == "Z":  # exited; its parent (pid 1 here) has not reaped it yet
            return True
        time.sleep(0.05)
    return False


def test_sigterm_writes_every_answer_then_the_writer_exits(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    env = {"MCSERVE_AUDIT": "true", "MCSERVE_AUDIT_PATH": str(db), "MCSERVE_DRAIN_GRACE_S": "0"}
    with serve(tmp_path, env=env) as srv:
        [writer] = [p for p in srv.children() if "service.audit.sink" in _command(p)]
        with httpx.Client(base_url=srv.url, timeout=30) as client:
            codes = [
                client.post("/v1/models/breast-cancer:predict", json=BODY).status_code
                for _ in range(25)
            ]
        assert codes == [200] * 25
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(60) == 0
        assert _gone(writer, 10)
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM audit_records").fetchone()[0] == 25


def test_killed_server_leaves_no_writer_process(tmp_path: Path) -> None:
    env = {"MCSERVE_AUDIT": "true", "MCSERVE_AUDIT_PATH": str(tmp_path / "audit.db")}
    with serve(tmp_path, env=env) as srv:
        [writer] = [p for p in srv.children() if "service.audit.sink" in _command(p)]
        os.kill(srv.proc.pid, signal.SIGKILL)
        srv.proc.wait(10)
        # The writer is in a session of its own (a terminal's Ctrl-C does not reach it): it ends
        # because its socket to the server closed.
        assert _gone(writer, 10), _command(writer)
