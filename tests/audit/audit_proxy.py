"""A TCP proxy on 127.0.0.1 that a test can stop and restart (a real database outage), or
freeze: connections stay open and acknowledged but nothing is forwarded (a stalled path), freeze
just after forwarding a client's message that holds a marker (an answer lost after a COMMIT), or
forward the client's bytes at a limited rate (a slow link)."""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time


class Proxy:
    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self.frozen = threading.Event()
        self.freeze_on: bytes | None = None  # freeze once a client's data holding this is sent
        self.rate: float | None = None  # bytes per second, client to server
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])

    def freeze(self) -> None:
        """Forward nothing more, in either direction, and close nothing."""
        self.frozen.set()

    def thaw(self) -> None:
        self.frozen.clear()

    def start(self) -> None:
        ln = socket.socket()
        ln.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ln.bind(("127.0.0.1", self.port))
        ln.listen(16)
        self._listener = ln
        threading.Thread(target=self._accept, args=(ln,), daemon=True).start()

    def stop(self) -> None:
        """Refuse new connections and cut the open ones."""
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        with self._lock:
            for c in self._conns:
                with contextlib.suppress(OSError):
                    c.shutdown(socket.SHUT_RDWR)
                c.close()
            self._conns.clear()

    def _accept(self, ln: socket.socket) -> None:
        while True:
            try:
                client, _ = ln.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peers = {a: b, b: a}
        try:
            while True:
                if self.frozen.is_set():
                    time.sleep(0.05)
                    continue
                ready, _, _ = select.select([a, b], [], [], 0.05)
                for s in ready:
                    data = s.recv(16384 if self.rate else 65536)
                    if not data:
                        return
                    if s is a and self.rate:
                        time.sleep(len(data) / self.rate)
                    peers[s].sendall(data)
                    if s is a and self.freeze_on is not None and self.freeze_on in data:
                        self.freeze_on = None
                        self.frozen.set()
        except (OSError, ValueError):
            return
        finally:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.close()
