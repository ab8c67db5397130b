"""The test servers' port: one taken between its choice and the server's bind is chosen again.

uvicorn binds after the models load, seconds after `free_port` chose the port; with the suite
on two workers, another process may take it meanwhile. The server then exited ("address already
in use") and the test failed for nothing.
"""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import pytest
import server as server_module
from server import serve


def test_a_port_taken_before_the_bind_is_chosen_again(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = int(taken.getsockname()[1])
        ports = iter([busy])
        real = server_module.free_port
        monkeypatch.setattr(server_module, "free_port", lambda: next(ports, None) or real())
        with serve(tmp_path, model_dir=repo) as srv:
            assert srv.port != busy
            assert httpx.get(f"{srv.url}/readyz", timeout=5).status_code == 200
    assert any("already in use" in p.read_text().lower() for p in tmp_path.glob("server-*.log"))
