"""Start a real `python -m service serve` process on 127.0.0.1 for end-to-end tests."""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from bench.common import children

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.proc = proc
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = log

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def children(self) -> list[int]:
        """PIDs of the server's child processes (its compute process, its audit writer)."""
        return children(self.proc.pid)


def _limit_files(n: int) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (n, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))


class PortTaken(RuntimeError):
    """The free port was taken before the server bound it (another process, another worker)."""


@contextmanager
def serve(
    tmp: Path,
    model_dir: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 120,
    nofile: int | None = None,
) -> Iterator[Server]:
    """`nofile`: the server's open-file limit (RLIMIT_NOFILE), e.g. to exhaust it in a test.
    A port taken between its choice and the server's bind (uvicorn binds after the models
    load, seconds later; tests run on two workers) is chosen again, up to three times."""
    for attempt in range(3):
        try:
            with _serve(tmp, model_dir, env, timeout, nofile) as server:
                yield server
            return
        except PortTaken:
            if attempt == 2:
                raise


@contextmanager
def _serve(
    tmp: Path,
    model_dir: Path | None,
    env: dict[str, str] | None,
    timeout: float,
    nofile: int | None,
) -> Iterator[Server]:
    port = free_port()
    log = tmp / f"server-{port}.log"
    cmd = [
        sys.executable,
        "-m",
        "service",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--model-dir",
        str(model_dir or ROOT / "models"),
        "--log-level",
        "info",
    ]
    full_env = {**os.environ, **(env or {})}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=full_env,
            preexec_fn=None if nofile is None else lambda: _limit_files(nofile),
        )
    server = Server(proc, port, log)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                said = server.output()
                if "address already in use" in said.lower():
                    raise PortTaken(said)
                raise RuntimeError(f"server exited with {proc.returncode}:\n{said}")
            try:
                if httpx.get(f"{server.url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready after {timeout}s:\n{server.output()}")
            time.sleep(0.1)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)  # tests that want a clean stop send SIGTERM first
            proc.wait(10)
