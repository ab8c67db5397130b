"""SIGTERM while the bundles load: the server stops loading and exits, rather than loading
every version first (the pod kept its CPU until the kubelet's SIGKILL, the manifests allowing
minutes of start-up)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from server import ROOT, free_port

from service.engine.registry import discover


def test_sigterm_while_loading_stops_loading_and_exits(tmp_path: Path) -> None:
    models = ROOT / "models"
    log = tmp_path / "server.log"
    cmd = [sys.executable, "-m", "service", "serve", "--host", "127.0.0.1"]
    cmd += ["--port", str(free_port()), "--model-dir", str(models), "--log-level", "info"]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while "model loaded" not in log.read_text(errors="replace"):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    said = log.read_text(errors="replace")
    assert code == 0, said
    assert "loading stopped: the server is shutting down" in said
    assert said.count('"model loaded"') < len(discover(models)), said
